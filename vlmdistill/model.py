"""`DistillationModel`: the module `wrap()` returns.

It registers exactly two children — the student and the plugin's trainable state — so that
`parameters()`, `state_dict()`, optimisers and DDP see the student plus training-only parts and
never the teacher. Its `forward` has the student's signature (plus the plugin's extra inputs) so the
HF Trainer keeps the right batch columns and finds the labels.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import __version__
from .errors import ConfigError, DataError, NonFiniteLossError
from .frozen import drop_frozen_gradients
from .hooks import HookManager
from .distributed import full_state_dict, is_dtensor, is_main_process, is_sharded, world_size
from .distributed import is_main_process as _is_rank_zero  # save_pretrained's keyword shadows the name
from .io import PLUGIN_CONFIG_NAME, PLUGIN_STATE_NAME, find_aliases, save_tensors, write_json
from .plugin import DistillationPlugin
from .sharding import ScalarParameters
from .teachers import is_peft_model


def _student_signature(student: nn.Module) -> inspect.Signature:
    target = student.get_base_model() if is_peft_model(student) else student
    return inspect.signature(target.forward)


def _forward_signature(student: nn.Module, plugin: DistillationPlugin) -> inspect.Signature:
    """The student's forward parameters, the plugin's extra inputs, and `num_items_in_batch`."""
    params = [p for p in _student_signature(student).parameters.values()]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for extra in (*plugin.extra_inputs, "num_items_in_batch"):
        if extra not in names:
            params.append(inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, default=None))
    # Keyword-only parameters must come after positional ones; keep relative order otherwise.
    order = {inspect.Parameter.POSITIONAL_ONLY: 0, inspect.Parameter.POSITIONAL_OR_KEYWORD: 1,
             inspect.Parameter.VAR_POSITIONAL: 2, inspect.Parameter.KEYWORD_ONLY: 3}
    params.sort(key=lambda p: order[p.kind])
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self_param, *params, *var_kw])


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def distillation_class_for(student: nn.Module, plugin: DistillationPlugin) -> type:
    """A `DistillationModel` subclass whose class-level `forward` carries the student's signature.

    The Trainer reads labels and loss support from the class (`find_labels(model.__class__)`), so an
    instance-level signature is not enough. One class per (student class, plugin class).
    """
    key = (type(student), type(plugin))
    if key not in _CLASS_CACHE:
        def forward(self, *args, **kwargs):
            return self._distill_forward(*args, **kwargs)

        forward.__signature__ = _forward_signature(student, plugin)
        forward.__doc__ = DistillationModel.forward.__doc__
        name = f"Distill{type(student).__name__}"
        _CLASS_CACHE[key] = type(name, (DistillationModel,), {"forward": forward, "__module__": __name__})
    return _CLASS_CACHE[key]


class DistillationModel(nn.Module):
    """A student with a distillation plugin attached. Build it with `vlmdistill.wrap`."""

    # The Trainer then passes `num_items_in_batch` and trusts the loss to be normalised by it.
    accepts_loss_kwargs = True

    def __init__(self, student: nn.Module, plugin: DistillationPlugin, scalars: ScalarParameters | None = None,
                 on_nonfinite: str = "raise") -> None:
        super().__init__()
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"on_nonfinite={on_nonfinite!r}: choose one of {', '.join(NONFINITE_POLICIES)}")
        self.student = student
        self.plugin = plugin
        #: what a NaN/inf loss term does in training: "raise" (default) or "skip" the optimizer step
        self.on_nonfinite = on_nonfinite
        self._inputs_checked = False
        self._nonfinite_seen = False      # a non-finite loss in the current optimizer step (skip mode)
        self._skip_decided: bool | None = None
        self._hooks = HookManager()
        self._frozen_hook = drop_frozen_gradients(self)
        # FSDP2 refuses 0-dim parameters: the student's (wrap() held them already) and the plugin's
        self._scalars = (scalars or ScalarParameters()).hold(plugin)
        self._student_params = inspect.signature(self.forward).parameters
        self._term_sums: dict[str, float] = {}
        self._term_micro_batches = 0
        self._term_window_normalised = False
        self._term_steps = 0
        self._detached = False
        self._keep_aliases = False
        #: whether the last optimizer step ended a training stage (see `step_end`)
        self.stage_ended = False
        # Tied weights share storage; safetensors (used by the Trainer's checkpoints) refuses that.
        self.register_state_dict_post_hook(_drop_aliases_hook)
        self.register_load_state_dict_pre_hook(_restore_aliases_hook)

    # ----------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward (same arguments, plus the plugin's extra inputs such as `kd_mask`).

        Returns the student's own output object with `.loss` = the total distillation loss,
        `.loss_terms` = a dict of its named parts and `.metrics` = the plugin's monitored quantities.
        """
        return self._distill_forward(*args, **kwargs)

    def _bind_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        names = [n for n, p in self._student_params.items()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(names):
            raise TypeError(f"{type(self.student).__name__}.forward takes {len(names)} positional arguments, "
                            f"got {len(args)}")
        bound = dict(zip(names, args))
        clash = set(bound) & set(kwargs)
        if clash:
            raise TypeError(f"got multiple values for argument(s) {sorted(clash)}")
        return {**bound, **kwargs}

    def _distill_forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._detached:
            raise RuntimeError("this DistillationModel was unwrapped; use the student returned by unwrap()")
        inputs = self._bind_inputs(args, kwargs)
        extras = {k: inputs.pop(k) for k in self.plugin.extra_inputs if k in inputs}
        num_items = inputs.pop("num_items_in_batch", None)
        if self.training and not self._inputs_checked:
            _check_finite_inputs({**inputs, **extras})
            self._inputs_checked = True
        if self.training:
            self._frozen_hook.track_zero3(self)
        result = self.plugin(self.student, inputs, extras, num_items)
        output = result.output
        if result.loss is not None:
            output = _attach_loss(output, result.loss, result.loss_terms, result.metrics)
            if self.training:
                values = _as_floats({**result.metrics, **result.loss_terms}, result.loss)
                checked = {k: v for k, v in values.items() if k not in result.metrics or k in result.loss_terms}
                if self._finite_or_flag(checked):
                    self._record_terms(values, window_normalised=num_items is not None)
        return output

    def _finite_or_flag(self, values: dict[str, float]) -> bool:
        """True when every term is finite; otherwise raise (default) or mark the optimizer step to be skipped."""
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        if not bad:
            return True
        step = int(self.plugin.global_step) + 1
        name, value = next(iter(bad.items()))
        where = f"loss term {name!r} is {value} in optimizer step {step}"
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"{where} (non-finite: {', '.join(sorted(bad))}). The batch, the learning rate or the model's "
                "numerics went wrong; wrap(..., on_nonfinite='skip') drops such optimizer steps instead")
        if not self._nonfinite_seen:
            warnings.warn(f"{where}: skipping this optimizer step (on_nonfinite='skip')", RuntimeWarning, stacklevel=3)
        self._nonfinite_seen = True
        return False

    def pre_optimizer_step(self, optimizer: Any = None) -> bool:
        """Before `optimizer.step()`: in skip mode, drop the step's gradients when any process saw a non-finite
        loss (params without a gradient are left untouched by the optimizer: no update, no weight decay, no moment
        change). Returns whether the step goes ahead. `DistillationCallback` calls it under the Trainer."""
        skip = self._nonfinite_seen
        if self.on_nonfinite == "skip":
            skip = _any_process(skip, _first_device(self))
        self._skip_decided = skip
        if skip:
            groups = optimizer.param_groups if optimizer is not None else [{"params": list(self.parameters())}]
            # A mixed-precision scaler refuses a step without gradients; NaN gradients make it skip the step itself.
            scaled = getattr(optimizer, "scaler", None) is not None
            for group in groups:
                for param in group["params"]:
                    if scaled and param.grad is not None:
                        param.grad.fill_(float("nan"))
                    else:
                        param.grad = None
        return not skip

    # ------------------------------------------------------------ step & logs
    def step_end(self, skipped: bool = False) -> bool:
        """Per-optimizer-step work (EMA, schedules, queues, stage switches). Call once after each
        `optimizer.step()` in a hand-written loop; `DistillationCallback` does it under the Trainer.

        A step the optimizer did not take (`skipped`: e.g. a mixed-precision overflow, or a non-finite loss under
        `on_nonfinite='skip'`) does no plugin work and does not advance `global_step`.

        Returns True when this step ended a training stage (`plugin.stage_boundaries()`): the next step belongs to
        a stage that wants a fresh optimizer state and schedule (`vlmdistill.stages.reset_optimizer_state`)."""
        decided = self._skip_decided if self._skip_decided is not None else self._nonfinite_seen
        self._nonfinite_seen, self._skip_decided = False, None
        self.stage_ended = False
        if skipped or decided:
            self.plugin.on_step_skipped()
            return False
        with torch.no_grad():
            self.plugin.global_step += 1
        self._term_steps += 1
        self.plugin.on_step_end()
        self.stage_ended = int(self.plugin.global_step) in self.plugin.stage_boundaries()
        return self.stage_ended

    def _record_terms(self, terms: dict[str, float], *, window_normalised: bool) -> None:
        terms = {name: value for name, value in terms.items() if name != "loss"}
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_micro_batches += 1
        self._term_window_normalised = window_normalised

    def pop_logged_terms(self, *, count_is_global: bool = True) -> dict[str, float]:
        """Loss terms since the last call, on the Trainer's `loss` scale: per optimizer step when the
        loss is normalised over the accumulation window, else per micro-batch.

        Under data parallelism the terms are reduced over ranks so that they equal the values one process
        would log for the whole global batch: window-normalised terms are summed when `num_items_in_batch` counts
        the items of all ranks (`count_is_global`, the Trainer's `average_tokens_across_devices`), per-batch
        means are averaged. A collective then: call it on every rank (the Trainer's logging does)."""
        names = sorted(self._term_sums)
        counts = [float(self._term_micro_batches), float(self._term_steps)]
        if world_size() > 1:
            names = _union_across_ranks(names)
            values = torch.tensor([self._term_sums.get(n, 0.0) for n in names] + counts, dtype=torch.float64,
                                  device=_collective_device())
            torch.distributed.all_reduce(values)
            sums = dict(zip(names, values[:len(names)].tolist()))
            micro_batches, steps = (values[len(names):] / world_size()).tolist()
            ranks = 1 if self._term_window_normalised and count_is_global else world_size()
        else:
            sums, (micro_batches, steps), ranks = dict(self._term_sums), counts, 1
        self._term_sums, self._term_micro_batches, self._term_steps = {}, 0, 0
        if not micro_batches:
            return {}
        denom = max(steps, 1.0) if self._term_window_normalised else micro_batches
        return {f"distill/{k}": v / denom / ranks for k, v in sums.items()}

    # ------------------------------------------------------------- lifecycle
    def unwrap(self) -> nn.Module:
        """Detach the plugin and return the original student object, exactly as it was."""
        if self._detached:
            return self.student
        self._hooks.remove_all()
        self._frozen_hook.remove()
        self.plugin.detach(self.student)
        self._scalars.release()
        self._detached = True
        return self.student

    def save_pretrained(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                        is_main_process: bool | None = None) -> None:
        """The student in its native format, plus `vlmdistill_plugin.json` (plugin name and config)
        and `vlmdistill_plugin_state.safetensors` (plugin state: projections, EMA, queues, counters).

        Sharded models (FSDP2, DeepSpeed ZeRO-3) are gathered and written by rank 0: call it on every rank.
        `state_dict`: the wrapper's full state dict when the caller has gathered it already (the Trainer).
        `is_main_process` is accepted for the Trainer's call (its `should_save`); the writer is always global rank
        0, since every rank takes part in the gathers. Any other keyword is refused."""
        if state_dict is None:
            self._keep_aliases = True  # tied weights are the savers' business (transformers, save_tensors)
            try:
                state_dict = full_state_dict(self) if world_size() > 1 or is_sharded(self) else self.state_dict()
            finally:
                self._keep_aliases = False
        main = _is_rank_zero()
        student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        if main:
            _check_not_empty(student_state, "student")
            os.makedirs(directory, exist_ok=True)
        # Every rank: a plugin may gather more (an EMA teacher it exports); only rank 0 writes.
        self.plugin.save_student(self.student, directory, state_dict=_with_aliases(self.student, student_state))
        if not main:
            return
        write_json(os.path.join(directory, PLUGIN_CONFIG_NAME), {
            "plugin": self.plugin.name,
            "config": self.plugin.config.to_dict(),
            "on_nonfinite": self.on_nonfinite,
            "vlmdistill_version": __version__,
            "student_class": f"{type(self.student).__module__}.{type(self.student).__qualname__}",
        })
        plugin_state = {k[len("plugin."):]: v for k, v in state_dict.items() if k.startswith("plugin.")}
        save_tensors(plugin_state, os.path.join(directory, PLUGIN_STATE_NAME), metadata={"plugin": self.plugin.name})

    def export_student(self, directory: str) -> None:
        """Only the student, in its native format (what `unwrap(model).save_pretrained(directory)` writes for an
        unsharded model), gathered from FSDP2 shards or ZeRO-3 partitions first: call it on every rank."""
        sharded = world_size() > 1 or is_sharded(self.student)
        state = full_state_dict(self.student) if sharded else None
        if state is not None and is_main_process():
            _check_not_empty(state, "student")
        self.plugin.save_student(self.student, directory, state_dict=state)

    @property
    def teacher(self) -> nn.Module | None:
        return self.plugin.teacher

    def get_input_embeddings(self) -> nn.Module | None:
        """The student's, or None where it has none (transformers' CLIPModel raises; accelerate's FSDP2
        preparation asks every model)."""
        return _embeddings(self.student, "get_input_embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return _embeddings(self.student, "get_output_embeddings")

    @property
    def _no_split_modules(self) -> list[str]:
        """The student's transformer block classes (`vlmdistill.sharding.block_classes`), which accelerate's and
        the Trainer's FSDP auto-wrap policy read from the model it shards: one unit per decoder/encoder layer.
        (The student's own list can name classes it lacks, which accelerate refuses: LLaVA's.)"""
        from .sharding import block_class_names

        return block_class_names(self.student)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def __getattr__(self, name: str) -> Any:
        # Registered children/params first (nn.Module), then the student's attributes (config,
        # main_input_name, loss_type, ...) so code written for the student keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self.__dict__.get("_modules", {}).get("student")
            if student is None or name.startswith("__"):
                raise
            return getattr(student, name)


def _embeddings(student: nn.Module, getter: str) -> nn.Module | None:
    method = getattr(student, getter, None)
    try:
        return method() if callable(method) else None
    except NotImplementedError:
        return None


NONFINITE_POLICIES = ("raise", "skip")


def _as_floats(terms: dict[str, Any], loss: torch.Tensor) -> dict[str, float]:
    """The loss terms and the total as Python floats, with one device synchronisation for all of them."""
    names = [*terms, "loss"]
    values = [*terms.values(), loss]
    device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(v).detach().to(device=device, dtype=torch.float32).reshape(())
                           for v in values])
    return dict(zip(names, stacked.cpu().tolist()))


def _check_finite_inputs(batch: dict[str, Any]) -> None:
    """NaN/inf in a float input (images, features) trains NaN weights without a word: refuse the first batch."""
    for name, value in batch.items():
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise DataError(f"the first training batch has {bad} non-finite value(s) (NaN/inf) in {name!r} "
                                    f"(shape {tuple(tensor.shape)}); check how the data is decoded and normalised")


def _first_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _any_process(flag: bool, device: torch.device) -> bool:
    """`flag` OR-ed over all processes (every rank must skip the same steps)."""
    import torch.distributed as dist

    if world_size() == 1:
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


_WITH_LOSS: dict[type, type] = {}


def _with_loss_field(cls: type) -> type:
    """`cls` (a transformers ModelOutput dataclass) with an optional `loss` field added."""
    if cls not in _WITH_LOSS:
        _WITH_LOSS[cls] = dataclasses.make_dataclass(
            f"{cls.__name__}WithLoss", [("loss", Optional[torch.Tensor], dataclasses.field(default=None))],
            bases=(cls,), namespace={"__module__": __name__})
    return _WITH_LOSS[cls]


def _attach_loss(output: Any, loss: torch.Tensor, terms: dict[str, torch.Tensor],
                 metrics: dict[str, torch.Tensor]) -> Any:
    from transformers.utils import ModelOutput

    if isinstance(output, ModelOutput):
        if "loss" not in {f.name for f in dataclasses.fields(output)}:
            # e.g. a ViT's BaseModelOutputWithPooling: the same output with a `loss` field (DDP rebuilds outputs
            # from their fields when it looks for unused parameters)
            output = _with_loss_field(type(output))(**dict(output.items()))
        output["loss"] = loss  # item *and* attribute, also when the student computed none
        output.loss_terms = terms
        output.metrics = metrics
        return output
    if isinstance(output, dict):
        output = dict(output)
        output["loss"] = loss
        output["loss_terms"] = terms
        output["metrics"] = metrics
        return output
    return DistillationOutput(loss=loss, loss_terms=terms, metrics=metrics, student_output=output)


class DistillationOutput(dict):
    """Output for students whose own output is not a mapping (tuples, tensors, open_clip features)."""

    def __init__(self, loss: torch.Tensor, loss_terms: dict, metrics: dict, student_output: Any) -> None:
        super().__init__(loss=loss, student_output=student_output)
        self.loss = loss
        self.loss_terms = loss_terms
        self.metrics = metrics
        self.student_output = student_output


def _check_not_empty(state: dict[str, torch.Tensor], what: str) -> None:
    """ZeRO-3 placeholders read outside a gather are empty: never write those silently."""
    empty = [k for k, v in state.items() if v.numel() == 0 and v.dim() > 0]
    if empty:
        raise RuntimeError(f"the {what} state holds empty tensors ({empty[:3]}...): its parameters are partitioned "
                           "(DeepSpeed ZeRO-3) and were not gathered; save through the wrapper's save_pretrained")


def registered_aliases(module: nn.Module) -> dict[str, str]:
    """{alias name: kept name} of parameters and buffers registered under several names (tied weights).
    From the module structure, so it holds for sharded parameters alike and is the same on every rank."""
    seen: dict[int, str] = {}
    aliases = {}
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
    return aliases


def _state_aliases(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """Aliases among `state_dict`'s keys: registered tied weights, then plain tensors sharing storage
    (e.g. tied weights inside a plugin's EMA teacher copy)."""
    aliases = {prefix + a: prefix + k for a, k in registered_aliases(module).items()
               if prefix + a in state_dict and prefix + k in state_dict}
    plain = {k: v for k, v in state_dict.items()
             if k.startswith(prefix) and k not in aliases and not is_dtensor(v)}
    aliases.update(find_aliases(plain))
    return aliases


def _with_aliases(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its dropped tied-weight keys put back (pointing at the kept tensor)."""
    state = dict(state)
    for alias, kept in registered_aliases(module).items():
        if alias not in state and kept in state:
            state[alias] = state[kept]
    return state


def _drop_aliases_hook(module, state_dict, prefix, local_metadata):
    if getattr(module, "_keep_aliases", False):
        return
    for alias in _state_aliases(module, state_dict, prefix):
        del state_dict[alias]


def _restore_aliases_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    module._keep_aliases = True
    try:
        own = module.state_dict(keep_vars=True)
    finally:
        module._keep_aliases = False
    for alias, kept in _state_aliases(module, own, "").items():
        if prefix + alias not in state_dict and prefix + kept in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]


def _union_across_ranks(names: list[str]) -> list[str]:
    """Every rank's term names (ranks may have skipped a term, e.g. no distilled row on one of them)."""
    gathered: list[list[str]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part})


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
