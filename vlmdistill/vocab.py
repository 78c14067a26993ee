"""Which logits a teacher and a student can compare: their shared vocabulary."""

from __future__ import annotations

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
