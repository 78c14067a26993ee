"""`dcclip`: DC-CLIP (arXiv 2404.11249) two-stage compression of a (multilingual) CLIP.

Stage 1, per tower and independently: adapter(student image map) vs teacher patch-token map,
adapter(student text token states) vs teacher token states over non-padding tokens, optionally the
projected embeddings:  L1 = λ_img·L_img + λ_txt·L_txt + λ_emb·(L_emb_img + L_emb_txt).
Stage 2, teacher-free: symmetric InfoNCE on the student's own embeddings and logit scale.

The stage and the step it switched at are buffers of the plugin (saved, restored, broadcast by DDP);
the switch runs in `on_step_end`, i.e. once per optimizer step. Adapters are plugin parameters and
never part of the exported student.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.data.image_text import decode_keys
from vlmdistill.distributed import gathered_parameters, is_zero3
from vlmdistill.errors import ConfigError, DataError, IncompatibleTeacherError, UnsupportedModelError
from vlmdistill.plugin import DistillationPlugin, DistillationResult

from . import export
from .cache import TeacherCacheWriter, TeacherFeatureCache, module_fingerprint, teacher_dims
from .compat import check_eos_pooling, check_pooling_on_batch, check_token_level_text, tokenizer_identity
from .config import DCCLIPConfig
from .families import ClipModelSpec, describe_model
from .features import ModelTaps, TowerFeatures
from .losses import embedding_loss, image_map_loss, symmetric_info_nce, text_token_loss

logger = logging.getLogger("vlmdistill.dcclip")


class DCCLIPPlugin(DistillationPlugin):
    name = "dcclip"
    description = "DC-CLIP: per-tower feature distillation (stage 1), then teacher-free contrastive alignment " \
                  "(stage 2); teacher-feature cache"
    config_class = DCCLIPConfig
    teacher_policy = "optional"  # stage 1 needs a teacher or a teacher-feature cache; stage 2 needs neither
    extra_inputs = ("sample_key", "augmentation_seed", "teacher_pixel_values", "teacher_input_ids",
                    "teacher_attention_mask")
    runtime_args = ("student_tokenizer", "teacher_tokenizer", "data_fingerprint", "open_clip_config")
    demo = "vlmdistill.eval.experiments.dcclip:main"
    recipe_builders = ("vlmdistill.plugins.dcclip.recipes", "vlmdistill.eval.experiments.dcclip_recipes")
    #: `vlmdistill cache-teacher RECIPE.yaml`: precompute the teacher features of a recipe's data
    commands = {"cache-teacher": "vlmdistill.plugins.dcclip.recipes:cache_teacher_main"}

    def __init__(self, config: DCCLIPConfig, **runtime: Any) -> None:
        super().__init__(config, **runtime)
        self.register_buffer("stage", torch.tensor(int(config.stage), dtype=torch.long))
        self.register_buffer("switched_at_step", torch.tensor(-1, dtype=torch.long))
        self.adapters = nn.ModuleDict()
        self.own_logit_scale: nn.Parameter | None = None
        self.student_spec: ClipModelSpec | None = None
        self.teacher_spec: ClipModelSpec | None = None
        self.cache: TeacherFeatureCache | None = None
        self._student_taps: ModelTaps | None = None
        self._teacher_taps: ModelTaps | None = None
        self._pooling_checked = self._teacher_pooling_checked = False  # first batch only

    # ------------------------------------------------------------------ wrap
    def check_compatibility(self, student: nn.Module) -> None:
        cfg = self.config
        self.student_spec = describe_model(student, cfg.student_taps, role="student")
        check_eos_pooling(student, self.runtime.get("student_tokenizer"), "student")
        if cfg.stage == 1:
            self._check_stage1()
        if cfg.logit_scale == "student" and self.student_spec.logit_scale(student) is None:
            raise UnsupportedModelError(f"dcclip: logit_scale='student' but the {self.student_spec.family} student "
                                        "has no logit_scale parameter; use 'auto' or 'plugin'")

    def setup(self, student: nn.Module) -> None:
        cfg = self.config
        ref = next(student.parameters())
        if cfg.stage == 1:
            self._build_adapters(ref)
        if cfg.logit_scale == "plugin" or self.student_spec.logit_scale(student) is None:
            self.own_logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init), device=ref.device))

    def _check_stage1(self) -> None:
        cfg = self.config
        s_tok, t_tok = self.runtime.get("student_tokenizer"), self.runtime.get("teacher_tokenizer")
        if self.teacher is not None:
            self.teacher_spec = describe_model(self.teacher, cfg.teacher_taps, role="teacher")
            # without its own tokenizer the teacher reads the student's token ids
            check_eos_pooling(self.teacher, t_tok if t_tok is not None else s_tok, "teacher")
        if cfg.teacher_cache:
            self.cache = TeacherFeatureCache(cfg.teacher_cache)
        if self.teacher_spec is None and self.cache is None:
            raise ConfigError("dcclip stage 1 needs teacher=... or teacher_cache=<directory of cached teacher "
                              "features>; stage 2 alone (stage=2) needs neither")
        if cfg.text_weight > 0 and cfg.text_level == "tokens":
            if self.teacher_spec is not None:
                check_token_level_text(self.student_spec, self.teacher_spec, s_tok, t_tok)
            cached_tok = self.cache.manifest.get("teacher_tokenizer") if self.cache is not None else None
            if cached_tok and s_tok is not None and tokenizer_identity(s_tok) != cached_tok:
                raise IncompatibleTeacherError(
                    f"dcclip: the student tokenizer (id {tokenizer_identity(s_tok)}) differs from the tokenizer the "
                    f"cached teacher features were computed with (id {cached_tok}); token-level text distillation "
                    "needs one tokenizer (or set text_level='pooled')")
        if self.cache is not None:
            expected = module_fingerprint(self.teacher) if self.teacher is not None else cfg.teacher_fingerprint
            taps = self.teacher_spec.fingerprint_fields() if self.teacher_spec is not None else None
            self.cache.check(teacher_fingerprint=expected, taps=taps,
                             data_fingerprint=self.runtime.get("data_fingerprint"), needs=self._needed_features())

    def _build_adapters(self, ref: torch.Tensor) -> None:
        """Stage 1's training-only adapters from the student's widths to the teacher's, on `ref`'s device and dtype."""
        cfg = self.config
        dims = self._teacher_dims()
        s = self.student_spec
        if cfg.image_weight > 0:
            self.adapters["image"] = (nn.Conv2d(s.image_dim, dims["image_dim"], kernel_size=1) if cfg.adapter == "conv"
                                      else nn.Linear(s.image_dim, dims["image_dim"]))
        if cfg.text_weight > 0 and cfg.text_level == "tokens":
            self.adapters["text"] = nn.Linear(s.text_dim, dims["text_dim"])
        if self._uses_embeddings() and s.embed_dim != dims["embed_dim"]:
            # Equal widths need no adapter: the student then learns the teacher's embedding space itself.
            self.adapters["image_embed"] = nn.Linear(s.embed_dim, dims["embed_dim"], bias=False)
            self.adapters["text_embed"] = nn.Linear(s.embed_dim, dims["embed_dim"], bias=False)
        self.adapters.to(device=ref.device, dtype=ref.dtype)

    def _teacher_dims(self) -> dict[str, int | None]:
        if self.teacher_spec is not None:
            t = self.teacher_spec
            return {"image_dim": t.image_dim, "text_dim": t.text_dim, "embed_dim": t.embed_dim}
        return teacher_dims(self.cache)

    def _uses_embeddings(self) -> bool:
        cfg = self.config
        return cfg.embedding_weight > 0 or (cfg.text_weight > 0 and cfg.text_level == "pooled")

    def _needed_features(self) -> set[str]:
        cfg = self.config
        needs = set()
        if cfg.image_weight > 0:
            needs.add("image_map")
        if cfg.text_weight > 0:
            needs.add("text_tokens" if cfg.text_level == "tokens" else "text_embeds")
        if cfg.embedding_weight > 0:
            needs |= {"image_embeds", "text_embeds"}
        return needs

    def attach(self, student: nn.Module, hooks) -> None:
        self._student_taps = ModelTaps(student, self.student_spec, hooks, role="student")
        if self.teacher is not None and self.teacher_spec is not None:
            self._teacher_taps = ModelTaps(self.teacher, self.teacher_spec, hooks, role="teacher")

    def stage_boundaries(self) -> tuple[int, ...]:
        switch = self.config.switch_step()
        if self.config.restart_optimizer_at_switch and self.config.stage == 1 and switch is not None:
            return (switch,)
        return ()

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters this optimizer step leaves without a gradient: what the current stage does not
        use (stage 1: the logit scale, and without the embedding term the projections and pooling heads past the
        feature taps; stage 2: the adapters). They join no loss (not even with weight 0, which would give them a
        zero gradient that AdamW decays and counts as a step), so the optimizer skips them; naming them gives them
        the fresh optimizer state of `vlmdistill.frozen`, so every trainable parameter has a state to checkpoint
        and a sharded checkpoint taken in either stage loads strictly. Read right before each optimizer step, after
        backward and any DDP / FSDP2 gradient reduction: a parameter no rank used has no gradient there."""
        student = self.student.parameters() if self.student is not None else ()
        # ZeRO-3 keeps every gradient in its partitions (`.grad` is always None there); the wrapper finds the
        # parameters without one itself (`vlmdistill.frozen`).
        return [p for p in (*self.parameters(), *student) if p.requires_grad and p.grad is None and not is_zero3(p)]

    def _teacher_tokenizer_differs(self) -> bool:
        s_tok, t_tok = self.runtime.get("student_tokenizer"), self.runtime.get("teacher_tokenizer")
        return s_tok is not None and t_tok is not None and tokenizer_identity(s_tok) != tokenizer_identity(t_tok)

    # --------------------------------------------------------------- forward
    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        if not self._pooling_checked:
            # once: a CLIP text tower must pool each caption at its end-of-text token (not at a word)
            check_pooling_on_batch(student, self.student_spec.canonical(inputs)[1], "student")
            self._pooling_checked = True
        if int(self.stage) == 2:
            out, loss, terms = self._stage2(student, inputs)
        else:
            out, loss, terms = self._stage1(student, inputs, extras)
        # Parameters a stage does not use get no gradient at all (see frozen_parameters); DDP needs
        # find_unused_parameters=True (the Trainer's default for this wrapper).
        return DistillationResult(output=out, loss=loss, loss_terms=terms)

    def logit_scale(self) -> nn.Parameter | None:
        """The stage-2 temperature: the plugin's own, else the student's. Looked up on every use: sharding
        replaces the student's parameter objects after wrap()."""
        if self.own_logit_scale is not None:
            return self.own_logit_scale
        return self.student_spec.logit_scale(self.student) if self.student is not None else None

    def _stage2(self, student: nn.Module, inputs: dict[str, Any]):
        out = student(**inputs)
        image, text = self.student_spec.embeddings(out)
        scale = self.logit_scale()
        loss = symmetric_info_nce(image, text, scale, max_scale=self.config.logit_scale_max,
                                  gather=self.config.gather_across_ranks)
        return out, loss, {"contrastive": loss.detach()}

    def _stage1(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any]):
        cfg = self.config
        pixels, ids, mask = self.student_spec.canonical(inputs)
        if pixels is None or ids is None:
            pix_key, ids_key, _ = self.student_spec.input_names
            raise DataError(f"dcclip stage 1 needs both towers' inputs: the batch lacks {pix_key!r} or {ids_key!r}")
        with self._student_taps.record() as store:
            out = student(**inputs)
        s = self._student_taps.features(store, out, pixels, mask)
        ref = s.image_embeds
        t = self.teacher_features(pixels, ids, mask, extras).to(ref.device, ref.dtype)
        t = t.normalised(cfg.teacher_feature_norm)

        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=ref.device, dtype=torch.float32)
        if cfg.image_weight > 0:
            terms["image"] = image_map_loss(s.image_map, t.image_map, self.adapters["image"], kind=cfg.feature_loss,
                                            beta=cfg.smooth_l1_beta, align=cfg.spatial_align,
                                            mode=cfg.interpolation).mean()
            total = total + cfg.image_weight * terms["image"]
        if cfg.text_weight > 0:
            if cfg.text_level == "tokens":
                n = min(s.text_mask.shape[1], t.text_mask.shape[1])
                valid = s.text_mask[:, :n] & t.text_mask[:, :n].to(s.text_mask.device)
                terms["text"] = text_token_loss(s.text_tokens, t.text_tokens, valid, self.adapters["text"],
                                                kind=cfg.feature_loss, beta=cfg.smooth_l1_beta,
                                                normalisation=cfg.text_normalisation).mean()
            else:
                terms["text"] = embedding_loss(s.text_embeds, t.text_embeds, self.adapters["text_embed"]
                                               if "text_embed" in self.adapters else None,
                                               kind=cfg.embedding_loss, beta=cfg.smooth_l1_beta).mean()
            total = total + cfg.text_weight * terms["text"]
        if cfg.embedding_weight > 0:
            terms["image_embed"] = embedding_loss(s.image_embeds, t.image_embeds, self.adapters["image_embed"]
                                                  if "image_embed" in self.adapters else None,
                                                  kind=cfg.embedding_loss, beta=cfg.smooth_l1_beta).mean()
            terms["text_embed"] = embedding_loss(s.text_embeds, t.text_embeds, self.adapters["text_embed"]
                                                 if "text_embed" in self.adapters else None,
                                                 kind=cfg.embedding_loss, beta=cfg.smooth_l1_beta).mean()
            total = total + cfg.embedding_weight * (terms["image_embed"] + terms["text_embed"])
        return out, total, {k: v.detach() for k, v in terms.items()}

    # --------------------------------------------------------------- teacher
    def _teacher_inputs(self, pixels, ids, mask, extras):
        """What the teacher reads: the student's inputs, or the batch's teacher_* columns."""
        t_pixels = extras.get("teacher_pixel_values")
        t_ids = extras.get("teacher_input_ids")
        t_mask = extras.get("teacher_attention_mask")
        t_pixels = pixels if t_pixels is None else t_pixels
        if t_ids is None:
            if self._teacher_tokenizer_differs():
                raise DataError("dcclip: the teacher has its own tokenizer (teacher_tokenizer differs from "
                                "student_tokenizer), but the batch has no 'teacher_input_ids': the teacher would read "
                                "the student's token ids. Tokenise each caption for the teacher too (the image-text "
                                "data builders do it when given the teacher's tokenizer)")
            t_ids, t_mask = ids, mask
        elif t_mask is None:
            t_mask = (self.teacher_spec.derive_mask(t_ids) if self.teacher_spec is not None
                      else torch.ones_like(t_ids, dtype=torch.bool))
        else:
            t_mask = t_mask.bool()
        if t_ids is not ids and self.config.text_weight > 0 and self.config.text_level == "tokens":
            self._check_same_token_ids(ids, mask, t_ids, t_mask)
        return t_pixels, t_ids, t_mask

    @staticmethod
    def _check_same_token_ids(ids, mask, t_ids, t_mask) -> None:
        n = min(ids.shape[1], t_ids.shape[1])
        both = mask[:, :n] & t_mask[:, :n].to(mask.device)
        if not torch.equal(ids[:, :n][both], t_ids[:, :n].to(ids.device)[both]) or \
                not torch.equal(mask[:, :n], t_mask[:, :n].to(mask.device)):
            raise IncompatibleTeacherError("dcclip: teacher_input_ids differ from the student's input_ids at "
                                           "non-padding positions: token-level text distillation needs the same "
                                           "tokenizer on both sides (or set text_level='pooled')")

    def teacher_features(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                         extras: dict[str, Any]) -> TowerFeatures:
        """Teacher features of a batch: from the cache when one is configured, else a teacher forward."""
        t_pixels, t_ids, t_mask = self._teacher_inputs(pixels, ids, mask, extras)
        if self.cache is None:
            return self._live_teacher(t_pixels, t_ids, t_mask)
        keys, seeds = self._sample_keys(extras, t_ids.shape[0])
        if self.cache.missing(keys, seeds):
            if self.config.cache_miss == "teacher" and self._teacher_taps is not None:
                self.cache.misses += len(keys)
                return self._live_teacher(t_pixels, t_ids, t_mask)
        return self.cache.lookup(keys, seeds, t_ids.shape[1], ids=t_ids, mask=t_mask, pixels=t_pixels,
                                 check_inputs=self.config.cache_check_inputs)

    @staticmethod
    def _sample_keys(extras: dict[str, Any], batch: int) -> tuple[list[str], list[int]]:
        keys = extras.get("sample_key")
        if keys is None:
            raise DataError("dcclip: teacher_cache is set, so every batch needs a 'sample_key' column (and "
                            "'augmentation_seed' when augmentations vary) to look the teacher features up")
        if isinstance(keys, torch.Tensor) and keys.dim() == 2 and keys.dtype == torch.uint8:
            keys = decode_keys(keys)  # the collator's byte rows (tensors survive accelerate's batch dispatch)
        keys = [str(k) for k in (keys.tolist() if isinstance(keys, torch.Tensor) else keys)]
        seeds = extras.get("augmentation_seed")
        if seeds is None:
            seeds = [0] * batch
        else:
            seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if len(keys) != batch or len(seeds) != batch:
            raise DataError(f"dcclip: batch of {batch} samples has {len(keys)} sample keys and {len(seeds)} "
                            "augmentation seeds")
        return keys, seeds

    def _live_teacher(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> TowerFeatures:
        if self._teacher_taps is None:
            raise RuntimeError("dcclip: no teacher to compute features with (it was released at the stage switch, "
                               "or only a cache was given)")
        spec = self.teacher_spec
        if self.config.resize_teacher_pixels and tuple(pixels.shape[-2:]) != spec.image_size:
            pixels = F.interpolate(pixels.float(), size=spec.image_size, mode="bicubic",
                                   align_corners=False).to(pixels.dtype)
        if not self._teacher_pooling_checked:
            check_pooling_on_batch(self.teacher, ids, "teacher")
            self._teacher_pooling_checked = True
        with self._teacher_taps.record() as store:
            out = self.run_teacher(**spec.call_inputs(pixels, ids, mask))
        return self._teacher_taps.features(store, out, pixels, mask)

    # ----------------------------------------------------------------- cache
    @torch.no_grad()
    def build_teacher_cache(self, batches: Iterable[dict[str, Any]], directory: str, *,
                            samples_per_shard: int = 1024, dtype: torch.dtype = torch.float32,
                            progress: bool = True) -> str:
        """Run the teacher once over `batches` (in the student's input format, with `sample_key` and
        optionally `augmentation_seed`) and write its features to `directory`; returns the manifest path."""
        if self._teacher_taps is None:
            raise ConfigError("dcclip: building a teacher-feature cache needs teacher=... at wrap time (stage 1)")
        from tqdm.auto import tqdm

        writer = TeacherCacheWriter(directory, samples_per_shard=samples_per_shard, dtype=dtype, metadata={
            "teacher_fingerprint": module_fingerprint(self.teacher),
            "teacher_taps": self.teacher_spec.fingerprint_fields(),
            "data_fingerprint": self.runtime.get("data_fingerprint"),
            "teacher_tokenizer": tokenizer_identity(self.runtime.get("teacher_tokenizer")
                                                    or self.runtime.get("student_tokenizer")),
        })
        for batch in tqdm(batches, desc="teacher features", unit="batch", disable=not progress):
            extras = {k: batch[k] for k in self.extra_inputs if k in batch}
            pixels, ids, mask = self.student_spec.canonical(batch)
            t_pixels, t_ids, t_mask = self._teacher_inputs(pixels, ids, mask, extras)
            features = self._live_teacher(t_pixels, t_ids, t_mask)
            keys, seeds = self._sample_keys(extras, t_ids.shape[0])
            writer.add(keys, torch.tensor(seeds), features, ids=t_ids, pixels=t_pixels)
        return writer.close()

    # ---------------------------------------------------------- per step
    def on_step_end(self) -> None:
        switch = self.config.switch_step()
        if int(self.stage) == 1 and switch is not None and int(self.global_step) >= switch:
            self.stage.fill_(2)
            self.switched_at_step.fill_(int(self.global_step))
            logger.info("dcclip: stage 1 -> stage 2 after optimizer step %d", int(self.global_step))
            if self.config.release_teacher_at_switch:
                self._teacher_taps = None
                self.release_teacher()
                if self.cache is not None:  # stage 2 reads no teacher features
                    self.cache.close()
                    self.cache = None
        if int(self.stage) == 2:
            scale = self.logit_scale()
            if scale is not None:
                # open_clip's rule: keep exp(logit_scale) within [1, max]. Outside a forward the parameter is an
                # FSDP2 shard (clamped elementwise) or a ZeRO-3 partition (gathered for the clamp).
                with torch.no_grad(), gathered_parameters([scale], modify=True):
                    scale.clamp_(0.0, math.log(self.config.logit_scale_max))

    # ------------------------------------------------------------ export
    def save_student(self, student: nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> None:
        from vlmdistill.distributed import is_main_process

        if self.student_spec is not None and self.student_spec.is_open_clip:
            if is_main_process():
                config = self.runtime.get("open_clip_config") or getattr(student, "open_clip_model_cfg", None)
                export.save_open_clip(student, directory, config, state_dict=state_dict)
            return
        super().save_student(student, directory, state_dict=state_dict)
        if is_main_process():
            export.save_tokenizer(self.runtime.get("student_tokenizer"), directory)

    @classmethod
    def load_student(cls, student: nn.Module | None, directory: str) -> nn.Module:
        import os

        if os.path.isfile(os.path.join(directory, export.OPEN_CLIP_WEIGHTS)):
            if student is None:
                raise DataError(f"{directory} holds an open_clip student: pass the model object, load(dir, model=...)")
            return export.load_open_clip_weights(student, directory)
        return super().load_student(student, directory)
