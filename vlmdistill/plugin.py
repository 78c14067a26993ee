"""The base class every distillation plugin derives from.

A plugin is an `nn.Module` that owns what is trainable only during distillation (projections,
adapters, heads — registered normally, so the optimiser sees them) and keeps everything else
(the teacher, the student, EMA copies, queues) outside module registration. Its lifecycle, driven by
`vlmdistill.wrap` and `DistillationModel`:

    check_compatibility(student)     at wrap time: checks only (raises on a mismatch), builds nothing
    setup(student)                   builds the training-only state: heads, projections, EMA teachers, queues
    attach(student, hooks)           register hooks / attention functions
    forward(student, inputs, ...)    one training micro-batch -> DistillationResult
    on_step_end()                    once per optimizer step (EMA, schedules, queues, stages)
    stage_boundaries()               steps after which a new stage starts a fresh optimizer and schedule
    detach(student)                  undo `attach` exactly (hooks are removed by the wrapper)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .config import PluginConfig
from .errors import ConfigError
from .teachers import EMATeacher, adapters_disabled, freeze, has_active_adapters, module_device, to_device


@dataclasses.dataclass
class DistillationResult:
    """What a plugin's forward returns: the student's own output object, the total loss, its named parts
    (unweighted values, logged as `distill/<name>`; `loss` combines them) and `metrics`: monitored quantities that
    are no part of the loss (logged the same way, never checked for NaN, not in the output's `loss_terms`)."""

    output: Any
    loss: torch.Tensor | None
    loss_terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class HiddenState(nn.Module):
    """A view of a plugin's `hidden_state()` (EMA teachers, queues) as the `hidden` submodule that its state-dict
    keys `plugin.hidden.<key>` name. It holds nothing itself (the plugin saves and loads the tensors); it lets
    tools that walk state-dict keys as attribute paths and list a module's own tensors with
    `named_buffers(recurse=False)` — `torch.distributed.checkpoint.state_dict`, which accelerate and the Trainer use
    for FSDP2 checkpoints — find them. `module.buffers()` of the wrapper does not list them (DDP does not sync them)."""

    def __init__(self, plugin: "DistillationPlugin") -> None:
        super().__init__()
        object.__setattr__(self, "_plugin", plugin)  # not a submodule: the plugin owns this view

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for key, tensor in self._plugin.hidden_state().items():
            yield (f"{prefix}.{key}" if prefix else key), tensor

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            found = _hidden_path(self._plugin.hidden_state(), name)
            if found is None:
                raise
            return found

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """The plugin loads the hidden tensors itself."""


class _HiddenPath:
    """A prefix of hidden-state keys, resolved one attribute at a time."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self._state, self._prefix = state, prefix

    def __getattr__(self, name: str) -> Any:
        found = _hidden_path(self._state, self._prefix + name)
        if found is None:
            raise AttributeError(f"no hidden state under {self._prefix + name!r}")
        return found


def _hidden_path(state: dict[str, torch.Tensor], key: str):
    if key in state:
        return state[key]
    if any(k.startswith(key + ".") for k in state):
        return _HiddenPath(state, key + ".")
    return None


class DistillationPlugin(nn.Module):
    #: registry name, e.g. "kd"
    name: ClassVar[str] = ""
    #: one line for `vlmdistill plugins`
    description: ClassVar[str] = ""
    config_class: ClassVar[type[PluginConfig]] = PluginConfig
    #: "required": wrap() needs teacher=...; "optional"; "none": the plugin builds its own (EMA)
    teacher_policy: ClassVar[str] = "required"
    #: batch keys the plugin consumes (kept through the Trainer's column pruning, not given to the student)
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: wrap() keyword arguments that are objects rather than config values (e.g. tokenizers)
    runtime_args: ClassVar[tuple[str, ...]] = ()
    #: "module:function" run by `vlmdistill demo <name>` (function takes an argv list, returns an exit code)
    demo: ClassVar[str | None] = None
    #: extra `vlmdistill` sub-commands: {"name": "module:function"} (function takes an argv list)
    commands: ClassVar[dict[str, str]] = {}
    #: module(s) whose import registers the plugin's recipe builders (`register_model_builder` /
    #: `register_data_builder`): a name or a tuple of names (the method's builders, its demo's under `eval/`);
    #: `vlmdistill.recipes` imports them when a recipe looks a builder up, never when the plugin is imported
    recipe_builders: ClassVar[str | tuple[str, ...] | None] = None
    #: under `DistillationTrainerMixin`, keep an accumulation window's micro-batches on the host (each moves to the
    #: device for its own forward), for plugins that see the whole window first (`on_accumulation_window`)
    window_on_host: ClassVar[bool] = False
    #: attributes that hold modules by plain reference, never registered: absent from `parameters()`,
    #: `state_dict()`, `named_modules()`, `.to()` / `.train()` and DDP/FSDP wrapping (a part of the student the plugin
    #: reads, a helper object that holds modules). Assign them as usual (`self._decoder = decoder`). The teacher,
    #: the student (`self.student`) and EMA teachers (`self.ema_teacher`) are held this way already.
    unregistered: ClassVar[tuple[str, ...]] = ()
    _core_unregistered: ClassVar[tuple[str, ...]] = ("_teacher", "_teacher_keep_alive", "_student")

    def __init__(self, config: PluginConfig, *, teacher: Any = None, **runtime: Any) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        # Optimizer steps seen; a buffer so it is saved, restored and kept equal across DDP ranks.
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        self.hidden = HiddenState(self)
        self._teacher_is_student_base = False
        self._student: nn.Module | None = None  # set by wrap() before check_compatibility
        self._ema_teachers: list[EMATeacher] = []
        self.set_teacher(teacher)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._core_unregistered or name in self.unregistered:
            object.__setattr__(self, name, value)  # a plain reference: nn.Module would register a module value
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ student
    @property
    def student(self) -> nn.Module | None:
        """The student this plugin is attached to (set by `wrap()` before `check_compatibility`), as an unregistered
        reference: the wrapper owns it. The same object after DDP/FSDP2/ZeRO-3 wrapping, whose parameters may then
        be shards (see `vlmdistill.distributed`)."""
        return self._student

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    @property
    def teacher_is_student_base(self) -> bool:
        """teacher='base': the teacher is the student itself, run with its PEFT adapters disabled."""
        return self._teacher_is_student_base

    def set_teacher(self, teacher: nn.Module | None, *, keep_alive: Any = None) -> None:
        """Hold `teacher` (frozen here: no gradients, eval mode) as the plugin's teacher, unregistered: absent from
        parameters(), state_dict(), named_modules(), .to()/.train() and DDP. `keep_alive`: an object that must live as
        long as the teacher is used (the DeepSpeed engine whose hooks gather a partitioned teacher)."""
        if isinstance(teacher, nn.Module):
            freeze(teacher)
        self._teacher = teacher
        self._teacher_keep_alive = keep_alive
        self._teacher_is_student_base = False

    def release_teacher(self) -> None:
        """Drop the teacher (e.g. once a stage that needs it is over) so its memory can be freed."""
        self._teacher = None
        self._teacher_keep_alive = None
        self._teacher_is_student_base = False

    def ema_teacher(self, source: nn.Module, *, buffers: str = "copy") -> EMATeacher:
        """A momentum teacher: a frozen copy of `source` (the student, or a plugin head) as it is now, moved by
        `update(momentum)` in `on_step_end`. Call it in `setup()`, before the student is hooked or sharded. The
        plugin keeps it on `source`'s device and floating dtype and, the first time it trains in a process group,
        equal to rank 0's copy on every rank (`teacher_context` and `update` see to both); `shard_teacher` shards
        every EMA teacher. Hold its `.module` with `set_teacher` when it is the teacher the plugin runs."""
        ema = EMATeacher(source, buffers=buffers)
        self._ema_teachers.append(ema)
        return ema

    def prepare_ema_teachers(self, *, collective: bool) -> None:
        """Every EMA teacher onto its source's device and dtype; with `collective` (every rank calls it), rank 0's
        values the first time a process group is met. `teacher_context` calls it (collective in training); a
        plugin whose teacher runs before the student is in training mode (msd's accumulation window) calls it."""
        for ema in self._ema_teachers:
            ema.prepare(collective=collective)

    def resolve_teacher(self, student: nn.Module, teacher: Any) -> None:
        """Interpret wrap()'s `teacher=` argument. `"base"` = the student's weights with adapters off."""
        if isinstance(teacher, str):
            if teacher != "base":
                raise ConfigError(f"teacher={teacher!r}: pass a model, None, or 'base' (PEFT adapters disabled)")
            if not has_active_adapters(student):
                raise ConfigError("teacher='base' needs a student carrying PEFT adapters (e.g. LoRA); "
                                  f"{type(student).__name__} has none")
            self.release_teacher()
            self._teacher = student  # not frozen: it is the student
            self._teacher_is_student_base = True
            return
        if teacher is None and self.teacher_policy == "required":
            raise ConfigError(f"plugin {self.name!r} needs a teacher: wrap(model, plugin={self.name!r}, teacher=...)")
        if teacher is not None and self.teacher_policy == "none":
            raise ConfigError(f"plugin {self.name!r} builds its own teacher; do not pass teacher=")
        if teacher is student:
            raise ConfigError("teacher is the student object itself; pass a separate (frozen) model, "
                              "or teacher='base' for a PEFT student")
        self.set_teacher(teacher)

    @contextlib.contextmanager
    def teacher_context(self, grad: bool | None = False) -> Iterator[nn.Module]:
        """The teacher in eval mode, without autograd; for teacher='base', the student with adapters off.

        `grad=True` keeps autograd on (the teacher's parameters stay frozen) for ablations whose loss must
        flow *through* the teacher into student tensors it consumes; `grad=None` keeps the caller's grad mode.
        EMA teachers are prepared first (`prepare_ema_teachers`, collective in training only)."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError(f"plugin {self.name!r} has no teacher")
        self.prepare_ema_teachers(collective=self.training)  # evaluation forwards run no collective
        was_training = teacher.training
        teacher.eval()
        try:
            with contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad):
                if self._teacher_is_student_base:
                    with adapters_disabled(teacher):
                        yield teacher
                else:
                    yield teacher
        finally:
            if self._teacher_is_student_base:
                teacher.train(was_training)  # the teacher *is* the student: give its mode back

    def run_teacher(self, *args: Any, **kwargs: Any) -> Any:
        """Teacher forward on the teacher's own device (inputs moved there)."""
        with self.teacher_context() as teacher:
            device = module_device(teacher)
            return teacher(*to_device(args, device), **to_device(kwargs, device))

    # ---------------------------------------------------------------- lifecycle
    def check_compatibility(self, student: nn.Module) -> None:
        """Raise `IncompatibleTeacherError` (or `UnsupportedModelError`, `ConfigError`) naming the mismatch. Checks
        only: it may record what it found (a model spec, a vocabulary width) but builds no module, parameter, buffer
        or EMA copy. Called by wrap() before setup()."""

    def setup(self, student: nn.Module) -> None:
        """Build the training-only state: heads and projections (assign them as usual: registered, so the
        optimizer trains them and they are saved as plugin state), EMA teachers (`self.ema_teacher`), queues,
        plugin parameters. Called once by wrap() after check_compatibility and before attach(), while the
        student carries no hook and is not sharded yet."""

    def attach(self, student: nn.Module, hooks) -> None:
        """Register hooks through `hooks` (a HookManager: removed automatically on unwrap)."""

    def detach(self, student: nn.Module) -> None:
        """Undo any change attach() made other than hooks (e.g. attention implementation)."""

    def forward(self, student: nn.Module, inputs: dict[str, Any], extras: dict[str, Any],
                num_items_in_batch: Any = None) -> DistillationResult:
        raise NotImplementedError

    def on_step_end(self) -> None:
        """Per-optimizer-step work. `global_step` already counts the step just taken."""

    def stage_boundaries(self) -> tuple[int, ...]:
        """Optimizer steps after which a new training stage begins with a fresh optimizer state and its own
        learning-rate schedule, warm-up included (`vlmdistill.stages`; `DistillationTrainer` applies it). A
        function of the config only, so a resumed run finds the same boundaries. Default: one stage."""
        return ()

    def on_step_skipped(self) -> None:
        """The optimizer did not take this step (mixed-precision overflow, or a non-finite loss under
        `on_nonfinite='skip'`): drop what the step's forwards prepared (windows, pending sums). No EMA, no schedule."""

    def on_train_begin(self, max_steps: int) -> None:
        """The run's length in optimizer steps, when the loop knows it (`DistillationCallback` passes the Trainer's
        `max_steps`), for schedules given as fractions of training."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that must get no optimizer update in the coming step (e.g. a DINO head's prototypes early in
        training). Their gradients are still computed and reduced; the wrapper sets `.grad = None` right before
        any optimizer step (`vlmdistill.frozen`), so AdamW neither decays them nor moves their moments."""
        return []

    def on_accumulation_window(self, batches: list[dict[str, Any]]) -> None:
        """Called by `DistillationTrainerMixin` with all micro-batches of the coming optimizer step,
        before the first of them is forwarded. Most plugins ignore it."""

    def shard_teacher(self, placement: str, **fsdp_kwargs: Any) -> None:
        """Shard the teacher for FSDP2 (`vlmdistill.shard(model, teacher=placement)`: 'shard' or 'offload'):
        every EMA teacher (an EMA head beside an EMA backbone) and a separate teacher, each once."""
        from .sharding import shard_teacher

        modules = [ema.module for ema in self._ema_teachers]
        if self.teacher is not None and not self._teacher_is_student_base and \
                all(self.teacher is not m for m in modules):
            modules.append(self.teacher)
        for module in modules:
            shard_teacher(module, placement, **fsdp_kwargs)

    # ------------------------------------------------------------- persistence
    def hidden_state(self) -> dict[str, torch.Tensor]:
        """Persistent tensors kept outside parameters/buffers (EMA teachers, queues). Saved with the plugin."""
        return {}

    def hidden_modules(self) -> dict[str, nn.Module]:
        """The modules behind `hidden_state()` entries, by key prefix (`{"teacher.": ema.module}`): their
        state-dict hooks also apply to gathered (sharded) state."""
        return {}

    def load_hidden_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"plugin {self.name!r} got unexpected hidden state keys {sorted(state)}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.hidden_state().items():
            destination[prefix + "hidden." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        hidden_prefix = prefix + "hidden."
        hidden = {k[len(hidden_prefix):]: state_dict[k] for k in list(state_dict) if k.startswith(hidden_prefix)}
        expected = set(self.hidden_state())
        if expected:
            absent = expected - set(hidden)
            if absent and strict:
                missing_keys.extend(hidden_prefix + k for k in sorted(absent))
            if not absent:
                self.load_hidden_state(hidden)
        elif hidden and strict:
            unexpected_keys.extend(hidden_prefix + k for k in hidden)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(hidden_prefix)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def save_student(self, student: nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> None:
        """Write the student in its native format. Override for non-HF models or other exports.

        Called on every rank (sharded state is gathered collectively); only rank 0 writes. `state_dict`: the
        student's full state (gathered from FSDP2 shards or ZeRO-3 partitions; `{}` on other ranks), None to
        write the student's own `state_dict()`."""
        from .io import save_student

        save_student(student, directory, state_dict=state_dict)

    @classmethod
    def load_student(cls, student: nn.Module | None, directory: str) -> nn.Module:
        """Inverse of `save_student`, used by `vlmdistill.load`."""
        from .io import load_student

        return load_student(directory, into=student)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def normaliser(local_count: torch.Tensor | int, num_items_in_batch: Any) -> torch.Tensor | int:
        """Denominator of a summed loss: the accumulation window's item count when the Trainer gives it
        (so k micro-batches equal one k× batch), else the local count; never below 1."""
        # Clamped at 1: a window with nothing supervised sums to exactly 0 and must give 0, not 0/0 (NaN), whose
        # gradient would poison every weight.
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                return num_items_in_batch.clamp_min(1)
            return max(num_items_in_batch, 1)
        if isinstance(local_count, torch.Tensor):
            return local_count.clamp_min(1)
        return max(int(local_count), 1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, teacher={type(self.teacher).__name__ if self.teacher is not None else None}"
