"""Which logits a teacher and a student can compare (their shared vocabulary), and a tokenizer's identity."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from .errors import IncompatibleTeacherError


def shared_vocabulary(student_width: int | None, teacher_width: int | None, *, student_tokenizer=None,
                      teacher_tokenizer=None, trust_prefix: bool = False) -> int | None:
    """Width of the vocabulary prefix both models speak, or raise naming the mismatch.

    Differing sizes are accepted when the smaller vocabulary is a prefix of the larger (padded vocabularies,
    extra image tokens): checked token by token when both tokenizers are given, or asserted by the user
    with `trust_prefix`. None when a width is unknown.
    """
    if student_width is None or teacher_width is None:
        return None
    shared = min(student_width, teacher_width)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        n = min(len(student_tokenizer), len(teacher_tokenizer), shared)
        s_tokens = student_tokenizer.convert_ids_to_tokens(list(range(n)))
        t_tokens = teacher_tokenizer.convert_ids_to_tokens(list(range(n)))
        if s_tokens != t_tokens:
            first = next(i for i, (a, b) in enumerate(zip(s_tokens, t_tokens)) if a != b)
            raise IncompatibleTeacherError(
                f"student and teacher tokenizers disagree at id {first}: {s_tokens[first]!r} for the student vs "
                f"{t_tokens[first]!r} for the teacher; distillation needs a shared vocabulary")
        return shared
    if student_width != teacher_width and not trust_prefix:
        raise IncompatibleTeacherError(
            f"vocabulary sizes differ: student {student_width} vs teacher {teacher_width}. Pass "
            "student_tokenizer= and teacher_tokenizer= to wrap() so the shared prefix can be checked, or set "
            "trust_vocab_prefix=True if the smaller vocabulary is known to be a prefix of the larger")
    return shared


def tokenizer_identity(tokenizer: Any) -> Optional[str]:
    """A hash of a tokenizer's vocabulary and special tokens (transformers, `tokenizers`, open_clip)."""
    if tokenizer is None:
        return None
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    if inner is not None and hasattr(inner, "get_vocab"):
        tokenizer = inner
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are call-time settings the backend remembers: not part of the identity.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        payload = json.dumps(state, sort_keys=True, ensure_ascii=False)
    elif hasattr(tokenizer, "get_vocab"):
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    elif hasattr(tokenizer, "encoder"):  # open_clip SimpleTokenizer
        payload = json.dumps(sorted(tokenizer.encoder.items()), ensure_ascii=False)
        payload += f"|{getattr(tokenizer, 'context_length', '')}"
    else:
        raise IncompatibleTeacherError(f"cannot read the vocabulary of a {type(tokenizer).__name__} tokenizer")
    special = getattr(tokenizer, "all_special_ids", None)
    if special is not None:
        payload += "|" + json.dumps(list(special))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]
