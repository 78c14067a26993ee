"""Core building blocks: config validation, registry, EMA teacher, tensor files with tied weights, hooks."""

import dataclasses
from typing import Literal, Optional

import pytest
import torch
from torch import nn

import vlmdistill
from vlmdistill.config import PluginConfig, option
from vlmdistill.errors import ConfigError
from vlmdistill.hooks import ActivationCapture, HookManager
from vlmdistill.io import find_aliases, load_tensors, save_tensors
from vlmdistill.teachers import EMATeacher


@dataclasses.dataclass
class _Inner(PluginConfig):
    path: str = option(help="a module path")
    weight: float = option(1.0, "weight", ge=0)


@dataclasses.dataclass
class _Config(PluginConfig):
    rate: float = option(0.1, "a rate", gt=0, le=1)
    steps: int = option(3, "steps", ge=0)
    mode: Literal["a", "b"] = option("a", "mode")
    name: Optional[str] = option(None, "optional name")
    pairs: list[_Inner] = option(default_factory=list, help="nested configs")
    table: dict[str, bool] = option(default_factory=dict, help="a mapping")


def test_config_accepts_valid_values_and_coerces_ints_to_floats():
    cfg = _Config.from_dict({"rate": 1, "pairs": [{"path": "x"}], "table": {"captions": True}})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.pairs[0] == _Inner(path="x", weight=1.0)
    assert cfg.to_dict()["pairs"] == [{"path": "x", "weight": 1.0}]


@pytest.mark.parametrize("values,match", [
    ({"rat": 1}, r"unknown key\(s\) \['rat'\]. Valid keys: rate, steps, mode, name, pairs, table"),
    ({"rate": 0}, "rate: 0.0 must be > 0"),
    ({"steps": 1.5}, "expected an integer"),
    ({"steps": True}, "expected an integer"),
    ({"mode": "c"}, r"not one of \['a', 'b'\]"),
    ({"pairs": [{"weight": 1}]}, "path"),
    ({"pairs": [{"path": "x", "wieght": 2}]}, r"pairs\[0\]: unknown key"),
    ({"table": {"x": "yes"}}, "expected true/false"),
])
def test_config_errors_name_field_and_valid_values(values, match):
    with pytest.raises(ConfigError, match=match):
        _Config.from_dict(values)


def test_describe_lists_every_field_with_help():
    rows = _Config.describe()
    assert [r[0] for r in rows] == _Config.field_names()
    assert all(r[3] for r in rows)


def test_register_plugin_rejects_non_plugins_and_duplicates():
    with pytest.raises(TypeError):
        vlmdistill.register_plugin(nn.Linear)
    kd = vlmdistill.get_plugin("kd")

    class Other(vlmdistill.DistillationPlugin):
        name = "kd"

    with pytest.raises(ValueError, match="already registered"):
        vlmdistill.register_plugin(Other)
    assert vlmdistill.get_plugin("kd") is kd


def test_ema_update_matches_per_parameter_formula_and_handles_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = EMATeacher(student, buffers="copy")
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(16, 4))  # moves BatchNorm running stats
    ema.update(momentum=0.9)
    s_state = student.state_dict()
    for key, value in ema.module.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, s_state[key]), key  # copied
        else:
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * s_state[key])
    assert all(not p.requires_grad for p in ema.module.parameters())

    averaged = EMATeacher(student, buffers="ema")
    old = averaged.module[1].running_mean.clone()
    student(torch.randn(16, 4))
    averaged.update(momentum=0.5)
    torch.testing.assert_close(averaged.module[1].running_mean, 0.5 * old + 0.5 * student[1].running_mean)


def test_tensor_files_keep_tied_weights_tied(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    state = model.state_dict()
    assert find_aliases(state) == {"head.weight": "emb.weight"}
    save_tensors(state, str(tmp_path / "m.safetensors"))
    loaded = load_tensors(str(tmp_path / "m.safetensors"))
    assert torch.equal(loaded["head.weight"], state["emb.weight"])
    assert loaded["head.weight"].data_ptr() == loaded["emb.weight"].data_ptr()


def test_activation_capture_records_only_inside_a_recording_and_hooks_are_removable():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    hooks = HookManager()
    capture = ActivationCapture(model, ["0", "2"], hooks)
    model(torch.randn(2, 3))
    with capture.record() as store:
        x = torch.randn(2, 3)
        out = model(x)
    assert set(store) == {"0", "2"} and torch.equal(store["2"], out)
    torch.testing.assert_close(store["0"], model[0](x))
    assert len(model[0]._forward_hooks) == len(model[2]._forward_hooks) == 1
    hooks.remove_all()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    with pytest.raises(vlmdistill.UnsupportedModelError, match="Some valid paths"):
        ActivationCapture(model, ["5"], HookManager())


def test_activation_capture_keeps_the_output_that_later_hooks_substitute():
    """DeepSpeed ZeRO-3 registers its hooks after wrap() and replaces module outputs by tensors whose backward
    re-gathers the weights: the capture must see those, not the tensors before them."""
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    capture = ActivationCapture(model, ["0"], HookManager())
    substituted = []

    def later_hook(module, args, output):  # stands for ZeRO-3's post-forward hook
        substituted.append(output * 1.0)
        return substituted[-1]

    model[0].register_forward_hook(later_hook)
    with capture.record() as store:
        model(torch.randn(2, 3))
    assert store["0"] is substituted[-1]
