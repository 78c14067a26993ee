"""Teacher/student checks made at wrap time (and on the first batch): token-level text distillation needs one
tokenizer, and a CLIP text tower must pool at the caption's end-of-text token."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vlmdistill.errors import DataError, IncompatibleTeacherError
from vlmdistill.hf import base_model
from vlmdistill.vocab import tokenizer_identity  # noqa: F401  (re-exported: used here and by the plugin)

from .families import ClipModelSpec

#: transformers' CLIP text tower reads eos_token_id == 2 as "pool at the highest token id" (configs from before
#: transformers PR #24773; right for OpenAI's BPE, whose end-of-text token has the highest id)
LEGACY_ARGMAX_EOS = 2
_CLIP_TEXT_TOWERS = ("CLIPTextModel", "CLIPTextTransformer")


def check_token_level_text(student: ClipModelSpec, teacher: ClipModelSpec, student_tokenizer: Any = None,
                           teacher_tokenizer: Any = None) -> None:
    """Token positions only line up when both towers read the same token ids: refuse otherwise. The vocabulary
    sizes are compared always, the tokenizers themselves when both are known."""
    hint = ("token-level text distillation needs the teacher's tokenizer on the student; give the student the "
            "teacher's tokenizer, or set text_level='pooled' to distil only the projected text embedding")
    if student.vocab_size is not None and teacher.vocab_size is not None and student.vocab_size != teacher.vocab_size:
        raise IncompatibleTeacherError(
            f"dcclip: student vocabulary ({student.family}, {student.vocab_size} tokens) differs from the teacher "
            f"vocabulary ({teacher.family}, {teacher.vocab_size} tokens), so they use different tokenizers; {hint}")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_id, t_id = tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer)
        if s_id != t_id:
            raise IncompatibleTeacherError(
                f"dcclip: student tokenizer ({type(student_tokenizer).__name__}, id {s_id}) differs from the teacher "
                f"tokenizer ({type(teacher_tokenizer).__name__}, id {t_id}); {hint}")


def clip_text_tower(model: nn.Module) -> Optional[nn.Module]:
    """The transformers CLIP text transformer of `model` (a CLIPModel, or a dual encoder with a CLIP text tower),
    i.e. the module whose pooling depends on `eos_token_id`; None for other text towers."""
    text = getattr(base_model(model), "text_model", None)
    text = getattr(text, "text_model", text)  # transformers < 5: CLIPTextModel wraps a CLIPTextTransformer
    return text if type(text).__name__ in _CLIP_TEXT_TOWERS and hasattr(text, "eos_token_id") else None


def check_eos_pooling(model: nn.Module, tokenizer: Any, role: str) -> None:
    """A CLIP text tower pools the hidden state of one position: the first `eos_token_id` of its config, or, with
    the legacy `eos_token_id=2`, the highest token id. Refuse a tokenizer whose end-of-text token is not what that
    rule finds (XLM-R's `</s>` is id 2: the legacy rule then pools at the caption's highest-id word)."""
    tower = clip_text_tower(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    if tower is None or eos is None:
        return
    configured = int(tower.eos_token_id)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if configured == LEGACY_ARGMAX_EOS:
        if size is None or eos == size - 1:
            return
        raise IncompatibleTeacherError(
            f"dcclip: the {role}'s CLIP text tower has text_config.eos_token_id=2, which transformers reads as its "
            f"legacy rule 'pool at the highest token id'; with this tokenizer (end-of-text id {eos} of {size}) that "
            "pools a word of the caption, not its end. Set text_config.eos_token_id to the tokenizer's end-of-text "
            f"id{' (impossible here: it is 2)' if eos == LEGACY_ARGMAX_EOS else f' ({eos})'}, use a text tower that "
            "pools the first token (AltCLIP's XLM-R, ChineseCLIP's BERT), or a tokenizer whose end-of-text token has "
            "the highest id")
    if configured != eos:
        raise IncompatibleTeacherError(
            f"dcclip: the {role}'s CLIP text tower pools at token id {configured} (text_config.eos_token_id) but "
            f"the tokenizer ends captions with id {eos}; set text_config.eos_token_id={eos}")


def check_pooling_on_batch(model: nn.Module, ids: torch.Tensor, role: str) -> None:
    """On a batch: a CLIP text tower must find every caption's end-of-text token. With its config's eos id, each
    row must hold that id (a row without it is pooled at position 0); with the legacy rule, the highest id of each
    row must be the vocabulary's last id (OpenAI's <|endoftext|>), not a word. Catches a wrong `eos_token_id`
    when no tokenizer was given to wrap()."""
    tower = clip_text_tower(model)
    if tower is None or ids is None:
        return
    eos = int(tower.eos_token_id)
    if eos == LEGACY_ARGMAX_EOS:
        last_id = int(tower.embeddings.token_embedding.num_embeddings) - 1
        wrong = (ids.max(dim=-1).values != last_id).nonzero()
        problem = (f"pools at the highest token id (transformers' legacy rule for eos_token_id=2), which is not the "
                   f"vocabulary's last id {last_id} (an end-of-text token there) but a word")
    else:
        wrong = (~(ids == eos).any(dim=-1)).nonzero()
        problem = f"pools at the first id {eos} (text_config.eos_token_id), which is absent: it pools position 0"
    if wrong.numel():
        row = int(wrong[0])
        raise DataError(f"dcclip: the {role}'s CLIP text tower {problem} in caption {row} (ids {ids[row].tolist()}); "
                        "set text_config.eos_token_id to the tokenizer's end-of-text id, or pass the tokenizer to "
                        "wrap() (student_tokenizer / teacher_tokenizer) for a check at wrap time")
