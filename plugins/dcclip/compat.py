"""Teacher/student checks made at wrap time: token-level text distillation needs one tokenizer."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from vlmdistill.errors import IncompatibleTeacherError

from .families import ClipModelSpec


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


def check_token_level_text(student: ClipModelSpec, teacher: ClipModelSpec, student_tokenizer: Any = None,
                           teacher_tokenizer: Any = None) -> None:
    """Token positions only line up when both towers read the same token ids: refuse otherwise."""
    hint = ("token-level text distillation needs the teacher's tokenizer on the student; give the student the "
            "teacher's tokenizer, or set text_level='pooled' to distil only the projected text embedding")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_id, t_id = tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer)
        if s_id != t_id:
            raise IncompatibleTeacherError(
                f"dcclip: student tokenizer ({type(student_tokenizer).__name__}, id {s_id}) differs from the teacher "
                f"tokenizer ({type(teacher_tokenizer).__name__}, id {t_id}); {hint}")
        return
    if student.vocab_size is not None and teacher.vocab_size is not None and student.vocab_size != teacher.vocab_size:
        raise IncompatibleTeacherError(
            f"dcclip: student vocabulary ({student.family}, {student.vocab_size} tokens) differs from the teacher "
            f"vocabulary ({teacher.family}, {teacher.vocab_size} tokens), so they use different tokenizers; {hint}")
