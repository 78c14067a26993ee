"""`DistillationModel`: the module `wrap()` returns.

It registers exactly two children — the student and the plugin's trainable state — so that
`parameters()`, `state_dict()`, optimisers and DDP see the student plus training-only parts and
never the teacher. Its `forward` has the student's signature (plus the plugin's extra inputs) so the
HF Trainer keeps the right batch columns and finds the labels.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import ConfigError, DataError, NonFiniteLossError
from .hooks import HookManager
from .io import PLUGIN_CONFIG_NAME, PLUGIN_STATE_NAME, find_aliases, save_tensors, write_json
from .plugin import DistillationPlugin
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

    def __init__(self, student: nn.Module, plugin: DistillationPlugin, on_nonfinite: str = "raise") -> None:
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
        self._student_params = inspect.signature(self.forward).parameters
        self._term_sums: dict[str, float] = {}
        self._term_micro_batches = 0
        self._term_window_normalised = False
        self._term_steps = 0
        self._detached = False
        self._keep_aliases = False
        # Tied weights share storage; safetensors (used by the Trainer's checkpoints) refuses that.
        self.register_state_dict_post_hook(_drop_aliases_hook)
        self.register_load_state_dict_pre_hook(_restore_aliases_hook)

    # ----------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward (same arguments, plus the plugin's extra inputs such as `kd_mask`).

        Returns the student's own output object with `.loss` = the total distillation loss and
        `.loss_terms` = a dict of its named parts.
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
        result = self.plugin(self.student, inputs, extras, num_items)
        output = result.output
        if result.loss is not None:
            output = _attach_loss(output, result.loss, result.loss_terms)
            if self.training:
                values = _as_floats(result.loss_terms, result.loss)
                if self._finite_or_flag(values):
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
    def step_end(self, skipped: bool = False) -> None:
        """Per-optimizer-step work (EMA, schedules, queues, stage switches). Call once after each
        `optimizer.step()` in a hand-written loop; `DistillationCallback` does it under the Trainer.

        A step the optimizer did not take (`skipped`: e.g. a mixed-precision overflow, or a non-finite loss under
        `on_nonfinite='skip'`) does no plugin work and does not advance `global_step`."""
        decided = self._skip_decided if self._skip_decided is not None else self._nonfinite_seen
        self._nonfinite_seen, self._skip_decided = False, None
        if skipped or decided:
            return
        with torch.no_grad():
            self.plugin.global_step += 1
        self._term_steps += 1
        self.plugin.on_step_end()

    def _record_terms(self, terms: dict[str, float], *, window_normalised: bool) -> None:
        terms = {name: value for name, value in terms.items() if name != "loss"}
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
        self._term_micro_batches += 1
        self._term_window_normalised = window_normalised

    def pop_logged_terms(self) -> dict[str, float]:
        """Loss terms since the last call, on the Trainer's `loss` scale: per optimizer step when the
        loss is normalised over the accumulation window, else per micro-batch."""
        if not self._term_micro_batches:
            return {}
        if self._term_window_normalised:
            denom = max(self._term_steps, 1)
        else:
            denom = self._term_micro_batches
        out = {f"distill/{k}": v / denom for k, v in self._term_sums.items()}
        self._term_sums, self._term_micro_batches, self._term_steps = {}, 0, 0
        return out

    # ------------------------------------------------------------- lifecycle
    def unwrap(self) -> nn.Module:
        """Detach the plugin and return the original student object, exactly as it was."""
        if self._detached:
            return self.student
        self._hooks.remove_all()
        self.plugin.detach(self.student)
        self._detached = True
        return self.student

    def save_pretrained(self, directory: str, **_: Any) -> None:
        """The student in its native format, plus `vlmdistill_plugin.json` (plugin name and config)
        and `vlmdistill_plugin_state.safetensors` (plugin state: projections, EMA, queues, counters)."""
        os.makedirs(directory, exist_ok=True)
        self.plugin.save_student(self.student, directory)
        write_json(os.path.join(directory, PLUGIN_CONFIG_NAME), {
            "plugin": self.plugin.name,
            "config": self.plugin.config.to_dict(),
            "on_nonfinite": self.on_nonfinite,
            "vlmdistill_version": __version__,
            "student_class": f"{type(self.student).__module__}.{type(self.student).__qualname__}",
        })
        save_tensors(self.plugin.state_dict(), os.path.join(directory, PLUGIN_STATE_NAME),
                     metadata={"plugin": self.plugin.name})

    @property
    def teacher(self) -> nn.Module | None:
        return self.plugin.teacher

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

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _attach_loss(output: Any, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> Any:
    from transformers.utils import ModelOutput

    if isinstance(output, ModelOutput):
        output["loss"] = loss  # item *and* attribute, also when the student computed none
        output.loss_terms = terms
        return output
    if isinstance(output, dict):
        output = dict(output)
        output["loss"] = loss
        output["loss_terms"] = terms
        return output
    return DistillationOutput(loss=loss, loss_terms=terms, student_output=output)


class DistillationOutput(dict):
    """Output for students whose own output is not a mapping (tuples, tensors, open_clip features)."""

    def __init__(self, loss: torch.Tensor, loss_terms: dict, student_output: Any) -> None:
        super().__init__(loss=loss, student_output=student_output)
        self.loss = loss
        self.loss_terms = loss_terms
        self.student_output = student_output


def _drop_aliases_hook(module, state_dict, prefix, local_metadata):
    if getattr(module, "_keep_aliases", False):
        return
    for alias in find_aliases(state_dict):
        del state_dict[alias]


def _restore_aliases_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    module._keep_aliases = True
    try:
        own = module.state_dict(keep_vars=True)
    finally:
        module._keep_aliases = False
    for alias, kept in find_aliases(own).items():
        if prefix + alias not in state_dict and prefix + kept in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + kept]
