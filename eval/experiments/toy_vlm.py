"""A miniature LLaVA built the way real VLMs are: a (pre-trained) vision encoder, a fresh projector and a copy
of a pre-trained language model, plus the digit-image data the demo and the recipe fine-tune it on.

The language model and the vision encoder are real transformers classes (`LlamaForCausalLM`,
`CLIPVisionModel`) and the VLM is a real `LlavaForConditionalGeneration`: it saves and loads with plain
transformers, and `vlmdistill.wrap(..., plugin="lingudistill")` sees exactly what it would see on a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

IMAGE_TOKEN = "<image>"
#: dataset name -> LinguDistill category of the two digit tasks and the text-only data
DIGIT_DATASETS = {"digit-captions": "captioning", "digit-qa": "vqa", "docstrings": "text"}


def llama_lm(vocab: int, *, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def vision_encoder(*, image_size: int = 16, patch_size: int = 4, hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                            num_attention_heads=4, image_size=image_size, patch_size=patch_size))


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_language_model(blocks: torch.Tensor, vocab: int, steps: int, *, seed: int = 1234):
    """The 'original' LM: next-token training on the docstring blocks (a plain loop, AdamW, cosine)."""
    lm = llama_lm(vocab, seed=seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    lm.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 3e-3, max(1, steps // 20))
        batch = blocks[torch.randint(0, blocks.shape[0], (32,), generator=g)]
        loss = lm(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return lm.eval()


def train_vision_encoder(images: torch.Tensor, labels: torch.Tensor, steps: int, *, seed: int = 1234):
    """A CLIP vision tower pre-trained as a digit classifier (mean of patch features + a linear probe)."""
    vision = vision_encoder(image_size=images.shape[-1], seed=seed)
    probe = torch.nn.Linear(vision.config.hidden_size, 10)
    params = list(vision.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    vision.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 2e-3, max(1, steps // 20))
        idx = torch.randint(0, images.shape[0], (64,), generator=g)
        feats = vision(pixel_values=images[idx]).last_hidden_state[:, 1:].mean(1)
        loss = torch.nn.functional.cross_entropy(probe(feats), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return vision.eval()


def image_tokens(vision) -> int:
    cfg = vision.config
    return (cfg.image_size // cfg.patch_size) ** 2  # LLaVA's "default" feature selection drops CLS


def student_tokenizer(lm_tokenizer):
    """The LM's tokenizer plus the image placeholder, appended after the LM's vocabulary."""
    import copy

    tok = copy.deepcopy(lm_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def llava_from_parts(lm, vision, image_token_id: int):
    """A `LlavaForConditionalGeneration` holding `lm`'s weights (vocabulary grown by the image token) and
    `vision`'s weights; the projector is freshly initialised."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = lm.config.to_dict()
    text["vocab_size"] = max(lm.config.vocab_size, image_token_id + 1)
    cfg = LlavaConfig(text_config=text, vision_config=vision.config.to_dict(), image_token_id=image_token_id,
                      projector_hidden_act="gelu", vision_feature_layer=-1,
                      vision_feature_select_strategy="default", tie_word_embeddings=False)
    vlm = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        state = lm.model.state_dict()
        vocab = lm.config.vocab_size
        embed = vlm.model.language_model.embed_tokens.weight
        embed[:vocab] = state.pop("embed_tokens.weight")
        embed[vocab:] = embed[:vocab].mean(0)
        missing, unexpected = vlm.model.language_model.load_state_dict(state, strict=False)
        assert not unexpected and missing == ["embed_tokens.weight"], (missing, unexpected)
        head = vlm.lm_head.weight
        head[:vocab] = lm.lm_head.weight
        head[vocab:] = lm.lm_head.weight.mean(0)
        vlm.model.vision_tower.load_state_dict(vision.state_dict())
    return vlm


@dataclasses.dataclass
class DigitSample:
    input_ids: list[int]
    labels: list[int]
    dataset: str
    image: torch.Tensor | None


class DigitTasks:
    """Captioning ("caption:" → "a handwritten seven.") and digit QA ("which digit?" → "seven") on real digit
    images, optionally mixed with text-only blocks. Prompts are unsupervised; answers end with EOS."""

    def __init__(self, tokenizer, n_image_tokens: int):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.n_image_tokens = n_image_tokens

    def _encode(self, prompt: str, answer: str, image: torch.Tensor, dataset: str) -> DigitSample:
        head = [self.tok.bos_token_id] + [self.image_id] * self.n_image_tokens + self.tok.encode(prompt)
        tail = self.tok.encode(answer) + [self.tok.eos_token_id]
        return DigitSample(head + tail, [-100] * len(head) + tail, dataset, image)

    def caption(self, image, label: int, template: int) -> DigitSample:
        from vlmdistill.data.digits import digit_caption

        return self._encode(" caption:", " " + digit_caption(label, "en", template), image, "digit-captions")

    def question(self, image, label: int) -> DigitSample:
        return self._encode(self.QA_PROMPT, self.qa_answer(label), image, "digit-qa")

    QA_PROMPT = " question: which digit is this? answer:"

    @staticmethod
    def qa_answer(label: int) -> str:
        from vlmdistill.data.digits import DIGIT_NAMES_EN

        return " " + DIGIT_NAMES_EN[label]

    def text(self, block: torch.Tensor) -> DigitSample:
        ids = block.tolist()
        return DigitSample(ids, list(ids), "docstrings", None)

    def mixture(self, images, labels, text_blocks: torch.Tensor | None, *, seed: int) -> list[DigitSample]:
        """One caption and one question per image, plus the text blocks, shuffled."""
        rng = random.Random(seed)
        samples = []
        for image, label in zip(images, labels.tolist()):
            samples.append(self.caption(image, label, rng.randrange(4)))
            samples.append(self.question(image, label))
        if text_blocks is not None:
            samples.extend(self.text(b) for b in text_blocks)
        rng.shuffle(samples)
        return samples


class SampleDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[DigitSample]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def collate_samples(samples: list[DigitSample], pad_id: int = 0) -> dict:
    """Right-padded token batch; `pixel_values` of the samples that have an image, in order."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "dataset": [s.dataset for s in samples]}
    images = [s.image for s in samples if s.image is not None]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch
