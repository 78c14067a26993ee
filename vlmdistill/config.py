"""Typed plugin configs: dataclasses whose fields carry a help text, validated from plain dicts.

Every plugin declares a `PluginConfig` subclass. `from_dict` rejects unknown keys (listing the
valid ones) and checks each value against the field's annotation, so a typo in a YAML recipe
fails before any model is touched. Nothing here can import or call user-named code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, le: float | None = None, gt: float | None = None, lt: float | None = None):
    """A config field with a help text and optional numeric bounds."""
    metadata = {"help": help, "ge": ge, "le": le, "gt": gt, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints are accepted for floats, dicts for nested configs)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where} key"): _coerce(v, val_tp, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, where=where) if issubclass(tp, PluginConfig) else tp(**value)
        raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


@dataclasses.dataclass
class PluginConfig:
    """Base of every plugin config. Subclasses are dataclasses whose fields use `option(...)`."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None, *, where: str | None = None, **overrides: Any):
        values = {**(values or {}), **overrides}
        where = where or cls.__name__
        valid = cls.field_names()
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(valid)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _coerce(values[f.name], hints[f.name], f"{where}.{f.name}")
        try:
            config = cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{where}: {exc}") from None
        config.validate(where)
        return config

    def validate(self, where: str | None = None) -> None:
        """Bounds from `option(ge=..., ...)`; subclasses add cross-field checks (call super)."""
        where = where or type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            meta = f.metadata
            for key, ok, text in (("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<="),
                                  ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
                bound = meta.get(key)
                if bound is not None and not ok(value, bound):
                    raise ConfigError(f"{where}.{f.name}: {value!r} must be {text} {bound}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each field — used by `vlmdistill plugins --verbose` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows


@dataclasses.dataclass
class LogitDistillationConfig(PluginConfig):
    """Options shared by plugins that distil a teacher's output distribution (`kd`, `lingudistill`)."""

    temperature: float = option(1.0, "softmax temperature; the KD term is scaled by temperature**2", gt=0.0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = option(
        "forward_kl", "forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher); jsd = JSD(beta)")
    jsd_beta: float = option(0.5, "teacher weight in the JSD mixture", gt=0.0, lt=1.0)
