"""Teacher/student checks made at wrap time: token-level text distillation needs one tokenizer."""

from __future__ import annotations

from typing import Any

from vlmdistill.errors import IncompatibleTeacherError
from vlmdistill.vocab import tokenizer_identity  # noqa: F401  (re-exported: used here and by the plugin)

from .families import ClipModelSpec


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
