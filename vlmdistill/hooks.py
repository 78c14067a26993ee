"""Hook bookkeeping and activation capture.

`HookManager` owns every handle a plugin registers so that `unwrap` can remove all of them.
`ActivationCapture` records module outputs by path into a dict that belongs to one forward call
(the wrapper opens a recording per forward), never into attributes on the modules themselves.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UnsupportedModelError


class HookManager:
    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward_hook(self, module: nn.Module, fn: Callable, **kwargs) -> Any:
        handle = module.register_forward_hook(fn, **kwargs)
        self._handles.append(handle)
        return handle

    def forward_pre_hook(self, module: nn.Module, fn: Callable, **kwargs) -> Any:
        handle = module.register_forward_pre_hook(fn, **kwargs)
        self._handles.append(handle)
        return handle

    def add(self, handle: Any) -> Any:
        """Track a handle registered elsewhere (anything with `.remove()`)."""
        self._handles.append(handle)
        return handle

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


def get_submodule(model: nn.Module, path: str, *, role: str = "model") -> nn.Module:
    """`model.get_submodule(path)` with an error that lists nearby valid paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        head = path.rsplit(".", 1)[0]
        near = [n for n in names if n.startswith(head)][:12] or names[:12]
        raise UnsupportedModelError(
            f"{role} has no submodule {path!r}. Some valid paths: {', '.join(near)}"
        ) from None


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module output (tensor, tuple/list, or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise UnsupportedModelError(f"module output of type {type(output).__name__} holds no tensor")


class ActivationCapture:
    """Capture the outputs of named submodules during a recording.

    Outputs outside a recording are ignored, so the hooks cost nothing at inference. Each recording moves the
    capture hooks behind every other forward hook of their modules, so they keep the output the model itself
    goes on with: DeepSpeed ZeRO-3 (whose hooks come after wrap()) replaces a module's outputs by tensors whose
    backward re-gathers the module's partitioned weights, and a capture of the tensors before that would
    back-propagate into released weights.
    """

    def __init__(self, model: nn.Module, paths: list[str], hooks: HookManager, *, role: str = "model",
                 transform: Callable[[Any], torch.Tensor] = first_tensor) -> None:
        self._store: dict[str, torch.Tensor] | None = None
        self.paths = list(paths)
        self._hooked: list[tuple[nn.Module, Callable, Any]] = []
        for path in self.paths:
            module = get_submodule(model, path, role=role)
            fn = self._make_hook(path, transform)
            self._hooked.append((module, fn, module.register_forward_hook(fn)))
        hooks.add(self)

    def _move_hooks_last(self) -> None:
        for i, (module, fn, handle) in enumerate(self._hooked):
            if next(reversed(module._forward_hooks), None) != handle.id:
                handle.remove()
                self._hooked[i] = (module, fn, module.register_forward_hook(fn))

    def remove(self) -> None:
        """Remove the hooks (HookManager calls this on unwrap)."""
        while self._hooked:
            self._hooked.pop()[2].remove()

    def _make_hook(self, path: str, transform: Callable):
        def hook(_module, _inputs, output):
            if self._store is not None:
                # Gradient checkpointing re-runs forwards in backward: the first capture wins.
                self._store.setdefault(path, transform(output))
        return hook

    @contextlib.contextmanager
    def record(self) -> Iterator[dict[str, torch.Tensor]]:
        self._move_hooks_last()
        previous, self._store = self._store, {}
        try:
            yield self._store
        finally:
            self._store = previous
