"""Real English prose that ships with Python (standard-library docstrings), the byte-level BPE tokenizer trainer,
and packing into fixed-length causal-LM examples."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from typing import Iterable, Literal, Optional, Sequence

import torch

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def _clean(doc: str) -> str:
    # Keep prose: drop doctest lines and indented code, collapse whitespace.
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    text = re.sub(r"\s+", " ", " ".join(lines)).strip()
    return text


def stdlib_docstrings(min_chars: int = 80) -> list[tuple[str, str]]:
    """(module path relative to the stdlib, cleaned docstring) for every docstring of at least `min_chars`,
    in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            for doc in _docstrings(path):
                text = _clean(doc)
                if len(text) >= min_chars and sum(c.isalpha() for c in text) > 0.6 * len(text):
                    items.append((rel, text))
    return items


def split_by_module(items: list[tuple[str, str]], held_out_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split by source module, so held-out text comes from unseen modules."""
    train, held = [], []
    for rel, text in items:
        bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < held_out_fraction else train).append(text)
    return train, held


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *,
                    special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>"), pad_token: str = "<pad>",
                    bos_token: str = "<bos>", eos_token: str = "<eos>", unk_token: Optional[str] = None,
                    add_bos_eos: bool = False, model_max_length: Optional[int] = None):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers `PreTrainedTokenizerFast` (the one trainer
    of the library's demos and tests; nothing is downloaded). `special_tokens` take the first ids, in order;
    `add_bos_eos` wraps every encoded text as `bos ... eos`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens)
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A {eos_token}",
            special_tokens=[(bos_token, specials.index(bos_token)), (eos_token, specials.index(eos_token))])
    names = dict(pad_token=pad_token, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                 model_max_length=model_max_length)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in names.items() if v is not None})


#: caption tokenizers' special-token layouts: name -> (special tokens in id order, (pad, unk, bos, eos) names)
CAPTION_LAYOUTS = {"default": (["<pad>", "<unk>", "<bos>", "<eos>"], ("<pad>", "<unk>", "<bos>", "<eos>")),
                   "xlm-r": (["<s>", "<pad>", "</s>", "<unk>"], ("<pad>", "<unk>", "<s>", "</s>"))}


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int = 320, max_length: int = 32,
                            layout: Literal["default", "xlm-r"] = "default"):
    """An English + Chinese caption tokenizer for CLIP text towers: `train_tokenizer` with fixed special ids,
    <pad>=0, <unk>=1, <bos>=2, <eos>=3, and every caption wrapped in <bos> ... <eos>.

    Byte-level BPE covers any UTF-8 text, so Chinese characters never fall out of the vocabulary. CLIP text towers
    pool at the first eos; an eos id of 2 would switch transformers' CLIP to its legacy argmax pooling, hence eos=3.
    `layout="xlm-r"` numbers them as XLM-R does (<s>=0, <pad>=1, </s>=2, <unk>=3: AltCLIP's tokenizer), eos id 2
    included."""
    specials, (pad, unk, bos, eos) = CAPTION_LAYOUTS[layout]
    return train_tokenizer(texts, vocab_size, special_tokens=specials, pad_token=pad, unk_token=unk, bos_token=bos,
                           eos_token=eos, add_bos_eos=True, model_max_length=max_length)


def pack_examples(texts: Iterable[str], tokenizer, block: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate `<bos> text <eos>` streams and cut them into `[N, block]` token blocks."""
    stream: list[int] = []
    for text in texts:
        stream.extend([tokenizer.bos_token_id, *tokenizer.encode(text), tokenizer.eos_token_id])
        if max_blocks is not None and len(stream) >= block * max_blocks:
            break
    n = len(stream) // block
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


@torch.no_grad()
def language_scores(model, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Held-out perplexity and next-token accuracy of a causal LM on `[N, T]` token blocks."""
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(next(model.parameters()).device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return {"perplexity": float(torch.exp(torch.tensor(nll / count))), "next_token_accuracy": correct / count,
            "tokens": count}
