"""Real-size benchmark presets: a SmolVLM-class student (Idefics3 architecture: SigLIP-like vision tower, pixel
shuffle connector, Llama text decoder) with random weights, its text-only teacher, and a batch shaped like VLM
instruction data.

    smolvlm-256m      SmolVLM-256M's text decoder: 576 wide x 30 layers, 9 query / 3 kv heads, vocabulary 49280
                      (teacher: SmolLM2-135M's shape, vocabulary 49152)
    smollm2-360m-vlm  the LinguDistill paper's LM (SmolLM2-360M): 960 wide x 32 layers, 15 / 5 heads
    tiny              the same code path at toy widths (tests)

The batch: 2 rows x 600 tokens, one row with 1 image and one with 5 (64 image tokens each between
`<fake_token_around_image><global-img>` ... `<fake_token_around_image>`, as SmolVLM's processor writes them), the
last 150 tokens of each row supervised. The vision tower has SigLIP-B's width (768, 12 heads, MLP 3072) but two
layers at 256 px (256 patches, pixel shuffle 2 -> 64 tokens): the language model, where distillation costs, is
real-size; the tower is kept small so a CPU step stays in seconds (it only adds the same work to every arm).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int                 # student vocabulary (the teacher's plus image-structure tokens)
    teacher_vocab: int
    vision_hidden: int = 768
    vision_layers: int = 2
    vision_heads: int = 12
    vision_intermediate: int = 3072
    image_size: int = 256
    patch_size: int = 16
    scale_factor: int = 2
    seq: int = 600
    images_per_row: tuple[int, ...] = (1, 5)
    supervised: int = 150
    prefix: int = 5            # text before the first image
    rope_theta: float = 100000.0

    @property
    def batch(self) -> int:
        return len(self.images_per_row)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens per image after the pixel shuffle."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor ** 2

    # SmolVLM's special ids sit above the teacher's vocabulary (the teacher cannot read them)
    @property
    def global_image_id(self) -> int:
        return self.teacher_vocab

    @property
    def fake_image_id(self) -> int:
        return self.teacher_vocab + 37

    @property
    def image_token_id(self) -> int:
        return self.teacher_vocab + 38

    def text_config(self, *, layers: int | None = None, vocab: int | None = None) -> dict:
        return dict(vocab_size=vocab or self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta}, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)

    def vision_config(self) -> dict:
        return dict(hidden_size=self.vision_hidden, intermediate_size=self.vision_intermediate,
                    num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                    image_size=self.image_size, patch_size=self.patch_size)


PRESETS = {
    "smolvlm-256m": Preset("smolvlm-256m", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536,
                           vocab=49280, teacher_vocab=49152),
    "smollm2-360m-vlm": Preset("smollm2-360m-vlm", hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560,
                               vocab=49280, teacher_vocab=49152),
    # The same code path at toy widths (tests): 2 rows x 120 tokens, 1 and 3 images of 4 tokens.
    "tiny": Preset("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=320, teacher_vocab=256,
                   vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, image_size=32,
                   patch_size=8, scale_factor=2, seq=120, images_per_row=(1, 3), supervised=30),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def smolvlm_student(preset: Preset, *, layers: int | None = None, seed: int = 0, device="cpu", dtype=torch.float32):
    """A SmolVLMForConditionalGeneration with the preset's shapes and random weights."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration

    cfg = SmolVLMConfig(text_config=LlamaConfig(**preset.text_config(layers=layers)).to_dict(),
                        vision_config=preset.vision_config(), image_token_id=preset.image_token_id,
                        scale_factor=preset.scale_factor, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = SmolVLMForConditionalGeneration(cfg)
    return model.to(dtype)


def text_teacher(preset: Preset, *, seed: int = 1, device="cpu", dtype=torch.float32):
    """The student's original language model: a Llama causal LM of the student decoder's shape (SmolLM2 ties its
    embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**preset.text_config(vocab=preset.teacher_vocab), "tie_word_embeddings": True})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def image_span(preset: Preset) -> list[int]:
    """Token ids one image takes in the prompt."""
    return ([preset.fake_image_id, preset.global_image_id] + [preset.image_token_id] * preset.image_tokens
            + [preset.fake_image_id])


def make_batch(preset: Preset, *, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    """input_ids / attention_mask / labels `[B, T]` and pixel_values `[B, max images, 3, H, W]` (rows with fewer
    images are padded with all-zero images, which SmolVLM drops)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for n_images in preset.images_per_row:
        head = torch.randint(3, preset.teacher_vocab, (preset.prefix,), generator=g).tolist()
        for _ in range(n_images):
            head += image_span(preset) + [int(torch.randint(3, preset.teacher_vocab, (1,), generator=g))]
        if len(head) + preset.supervised > preset.seq:
            raise ValueError(f"preset {preset.name}: {n_images} images take {len(head)} tokens; no room for "
                             f"{preset.supervised} supervised tokens in {preset.seq}")
        ids = torch.tensor(head + torch.randint(3, preset.teacher_vocab, (preset.seq - len(head),),
                                                generator=g).tolist())
        label = torch.full_like(ids, -100)
        label[-preset.supervised:] = ids[-preset.supervised:]
        rows.append(ids)
        labels.append(label)
    most = max(preset.images_per_row)
    pixels = torch.zeros(preset.batch, most, 3, preset.image_size, preset.image_size)
    for b, n_images in enumerate(preset.images_per_row):
        pixels[b, :n_images] = torch.rand(n_images, 3, preset.image_size, preset.image_size, generator=g) * 2 - 1
    input_ids = torch.stack(rows)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.stack(labels),
             "pixel_values": pixels.to(dtype)}
    return {k: v.to(device) for k, v in batch.items()}


def shared_token_ids(preset: Preset) -> list[int]:
    """The image-structure markers a processor would name (SmolVLM's config names only the image token)."""
    return [preset.fake_image_id, preset.global_image_id]
