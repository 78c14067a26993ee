"""`kd`: classic logit distillation (Hinton et al., 2015) for any HF model with logits.

loss = (1 − α)·task + α·τ²·D(p_teacher^τ, p_student^τ) + Σ_pairs w·feature_loss

Logits are compared at the supervised positions only (after the causal shift for LMs), over the
shared vocabulary prefix, by the chunked loss in `vlmdistill.losses`. All sums are divided by the
number of supervised items of the whole accumulation window when the Trainer provides it, so k
micro-batches give the same gradient as one batch k times larger.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.errors import DataError, UnsupportedModelError
from vlmdistill.hf import forward_parameters, infer_width, loss_shifts_labels, output_width
from vlmdistill.hooks import ActivationCapture, get_submodule
from vlmdistill.losses import (auto_chunk_rows, divergence_loss, feature_loss, standardize_logits, supervised_rows,
                               task_and_distill_sums)
from vlmdistill.plugin import DistillationPlugin, DistillationResult
from vlmdistill.vocab import shared_vocabulary

from .config import KDConfig


class KDPlugin(DistillationPlugin):
    name = "kd"
    description = "Logit distillation (Hinton KD; forward/reverse KL, JSD; logit standardization) + feature matching"
    config_class = KDConfig
    teacher_policy = "required"
    runtime_args = ("student_tokenizer", "teacher_tokenizer")
    demo = "vlmdistill.eval.experiments.kd:main"

    def __init__(self, config: KDConfig, **runtime: Any) -> None:
        super().__init__(config, **runtime)
        self.shared_width: int | None = None
        self.projections = nn.ModuleDict()
        self._feature_widths: list[tuple[int, int]] = []
        self._student_capture: ActivationCapture | None = None
        self._teacher_capture: ActivationCapture | None = None

    # ------------------------------------------------------------------ wrap
    def check_compatibility(self, student: nn.Module) -> None:
        teacher = self.teacher
        self.shared_width = shared_vocabulary(
            output_width(student), output_width(teacher),
            student_tokenizer=self.runtime.get("student_tokenizer"),
            teacher_tokenizer=self.runtime.get("teacher_tokenizer"),
            trust_prefix=self.config.trust_vocab_prefix)
        self._feature_widths = []  # (student, teacher) output width of each feature pair
        for i, pair in enumerate(self.config.features):
            s_mod = get_submodule(student, pair.student, role="student")
            t_mod = get_submodule(teacher, pair.teacher, role="teacher")
            s_dim = pair.student_dim or infer_width(s_mod)
            t_dim = pair.teacher_dim or infer_width(t_mod)
            if s_dim is None or t_dim is None:
                raise UnsupportedModelError(
                    f"features[{i}]: cannot tell the output width of {pair.student!r} (student: {s_dim}) or "
                    f"{pair.teacher!r} (teacher: {t_dim}); set student_dim / teacher_dim")
            self._feature_widths.append((s_dim, t_dim))

    def setup(self, student: nn.Module) -> None:
        for i, (s_dim, t_dim) in enumerate(self._feature_widths):
            if s_dim != t_dim:
                # Training-only projection: lives in the plugin, never in the exported student.
                self.projections[str(i)] = nn.Linear(s_dim, t_dim, bias=False)
        if self.projections:
            ref = next(student.parameters())
            self.projections.to(device=ref.device, dtype=ref.dtype)

    def attach(self, student: nn.Module, hooks) -> None:
        if not self.config.features:
            return
        self._student_capture = ActivationCapture(student, [p.student for p in self.config.features], hooks,
                                                  role="student")
        self._teacher_capture = ActivationCapture(self.teacher, [p.teacher for p in self.config.features], hooks,
                                                  role="teacher")

    # --------------------------------------------------------------- forward
    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        cfg = self.config
        labels = inputs.get("labels")
        shifts = loss_shifts_labels(student)
        # Next-token CE and KD over the same rows: one fused pass instead of the student's own CE + a second pass.
        fused = shifts and labels is not None and cfg.positions != "all" and not cfg.logit_standardization
        student_inputs = dict(inputs)
        if fused:
            del student_inputs["labels"]
        elif num_items_in_batch is not None and shifts and labels is not None:
            # HF causal-LM loss: sum / window count (clamped: an all-masked window gives 0, not NaN)
            student_inputs["num_items_in_batch"] = self.normaliser(0, num_items_in_batch)
        with self._recording(self._student_capture) as s_feats:
            s_out = student(**student_inputs)
        s_logits = s_out["logits"] if isinstance(s_out, dict) else s_out.logits
        if labels is not None:
            _check_label_shape(labels, s_logits)

        rows = self._distilled_rows(s_logits, labels, inputs.get("attention_mask"), shifts)
        teacher_inputs = self._teacher_inputs(inputs, rows, shifts)
        with self._recording(self._teacher_capture) as t_feats:
            t_out = self.run_teacher(**teacher_inputs)
        t_logits = t_out["logits"] if isinstance(t_out, dict) else t_out.logits
        s_2d, s_rows, t_2d, t_rows, count = self._select(s_logits, t_logits, rows, shifts,
                                                         "logits_to_keep" in teacher_inputs)
        denom = self.normaliser(count, num_items_in_batch if labels is not None else None)
        chunk_rows = cfg.chunk_rows or auto_chunk_rows(s_logits.shape[-1], s_logits.device)
        if fused:
            ce_weight = torch.full(labels.shape, 1.0 - cfg.alpha, dtype=torch.float64, device=labels.device)
            weighted, ce_sum, kd_sum = task_and_distill_sums(
                s_logits, labels, ce_weight, F.pad(rows, (0, 1)), t_rows, lambda ids: t_2d.index_select(0, ids),
                alpha=cfg.alpha, width=t_2d.shape[-1], kind=cfg.divergence, temperature=cfg.temperature,
                jsd_beta=cfg.jsd_beta, chunk_rows=chunk_rows)
            terms: dict[str, torch.Tensor] = {"kd": kd_sum / denom, "task": ce_sum / denom}
            total = weighted / denom
        else:
            if cfg.logit_standardization:  # z-scoring needs the selected rows themselves (autograd through it)
                s_2d, t_2d = (standardize_logits(x if r is None else x[r])
                              for x, r in ((s_2d, s_rows), (t_2d, t_rows)))
                s_rows = t_rows = None
            kd = divergence_loss(s_2d, t_2d, kind=cfg.divergence, temperature=cfg.temperature,
                                 jsd_beta=cfg.jsd_beta, chunk_rows=chunk_rows, student_rows=s_rows,
                                 teacher_rows=t_rows) / denom
            terms = {"kd": kd}
            task = self._task_loss(s_out, s_logits, labels, shifts, num_items_in_batch)
            if task is not None:
                terms["task"] = task
                total = (1.0 - cfg.alpha) * task + cfg.alpha * kd
            else:
                total = kd  # no labels: pure distillation
        if cfg.features:
            share = (count / denom) if num_items_in_batch is not None and labels is not None else 1.0
            for i, pair in enumerate(cfg.features):
                s_feat = s_feats[pair.student]
                if str(i) in self.projections:
                    s_feat = self.projections[str(i)](s_feat)
                t_feat = t_feats[pair.teacher].to(s_feat.device)
                mask = inputs.get("attention_mask") if s_feat.dim() == 3 else None
                value = feature_loss(s_feat, t_feat, pair.loss, mask=mask) * share
                terms[f"feature_{i}"] = value
                total = total + pair.weight * value
        return DistillationResult(output=s_out, loss=total, loss_terms=terms)

    @staticmethod
    def _recording(capture: ActivationCapture | None):
        import contextlib

        return capture.record() if capture is not None else contextlib.nullcontext({})

    def _distilled_rows(self, logits: torch.Tensor, labels, attention_mask, shifts: bool) -> torch.Tensor | None:
        """Boolean mask over the logit rows to distil (None = every row)."""
        use_labels = self.config.positions == "labels" or (self.config.positions == "auto" and labels is not None)
        if self.config.positions == "labels" and labels is None:
            raise ValueError("kd: positions='labels' but the batch has no labels")
        if logits.dim() == 2:  # one row per sample (classifiers)
            return (labels != -100) if use_labels and labels is not None and labels.dim() == 1 else None
        if use_labels:
            rows = supervised_rows(labels)[:, :-1] if shifts else labels != -100
        elif attention_mask is not None:
            rows = attention_mask[:, 1:].bool() if shifts else attention_mask.bool()
        else:
            rows = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            rows = rows[:, 1:] if shifts else rows
        return rows

    def _teacher_inputs(self, inputs: dict[str, Any], rows, shifts: bool) -> dict[str, Any]:
        names, takes_kwargs = forward_parameters(self.teacher)
        out = {k: v for k, v in inputs.items() if k != "labels" and (k in names or takes_kwargs)}
        if "use_cache" in names:
            out["use_cache"] = False  # no KV cache for a single teacher pass
        if "logits_to_keep" in names and shifts and rows is not None and rows.dim() == 2:
            # Only the columns some row distils: the teacher's LM head skips the rest.
            out["logits_to_keep"] = rows.any(0).nonzero().squeeze(-1)
        return out

    def _select(self, s_logits, t_logits, rows, shifts: bool, teacher_kept: bool):
        """`(student [N, V], student row indices, teacher [M, V], teacher row indices, count)` over the shared
        vocabulary. Indices (not copies) select the rows, so the divergence gathers them chunk by chunk."""
        width = self.shared_width or min(s_logits.shape[-1], t_logits.shape[-1])
        if s_logits.shape[-1] != width:
            s_logits = s_logits[..., :width]
        t_logits = t_logits[..., :width].to(s_logits.device)
        if s_logits.dim() == 2:
            if rows is None:
                return s_logits, None, t_logits, None, s_logits.shape[0]
            index = rows.nonzero().squeeze(-1)
            return s_logits, index, t_logits, index, rows.sum()
        # rows: [B, T'] over the (shifted) positions; student row (b, t) is logits row b·T + t either way,
        # because the causal shift only drops the last position.
        b, t = rows.nonzero(as_tuple=True)
        s_index = b * s_logits.shape[1] + t
        if shifts and teacher_kept:  # teacher logits exist only at the kept columns, in order
            cols = rows.any(0).nonzero().squeeze(-1)
            slot = torch.full((rows.shape[1],), -1, dtype=torch.long, device=rows.device)
            slot[cols] = torch.arange(cols.numel(), device=rows.device)
            t_index = b * cols.numel() + slot[t]
        else:
            t_index = b * t_logits.shape[1] + t
        return (s_logits.reshape(-1, width), s_index, t_logits.reshape(-1, width), t_index.to(t_logits.device),
                rows.sum())

    def _task_loss(self, s_out, s_logits, labels, shifts: bool, num_items_in_batch) -> torch.Tensor | None:
        if labels is None:
            return None
        if shifts:
            return s_out["loss"] if isinstance(s_out, dict) else s_out.loss
        if s_logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
            ce = F.cross_entropy(s_logits.float(), labels, ignore_index=-100, reduction="sum")
            return ce / self.normaliser((labels != -100).sum(), num_items_in_batch)
        loss = s_out["loss"] if isinstance(s_out, dict) else getattr(s_out, "loss", None)
        if loss is None:
            raise UnsupportedModelError(f"the student's {type(s_out).__name__} has no loss for labels of shape "
                                        f"{tuple(labels.shape)}; kd computes CE itself only for class-index labels")
        return loss


def _check_label_shape(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels must line up with the logit rows; a mismatch would otherwise pair the wrong rows silently."""
    if logits.dim() >= 3:
        ok = tuple(labels.shape) == tuple(logits.shape[:-1])
        expected = f"{tuple(logits.shape[:-1])} (one label per logit row)"
    else:  # one row per sample: class indices [B], or per-class targets [B, C]
        ok = labels.shape[0] == logits.shape[0] and (labels.dim() == 1 or tuple(labels.shape) == tuple(logits.shape))
        expected = f"({logits.shape[0]},) or {tuple(logits.shape)}"
    if not ok:
        raise DataError(f"kd: labels of shape {tuple(labels.shape)} do not fit logits of shape "
                        f"{tuple(logits.shape)}; expected labels of shape {expected}")
