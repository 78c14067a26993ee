"""The plugin lifecycle the core drives (check_compatibility → setup → attach), unregistered references, the
public teacher API, and EMA teachers that follow their source's device and agree across processes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vlmdistill
from vlmdistill import registry
from vlmdistill.plugin import DistillationPlugin, DistillationResult
from vlmdistill.teachers import module_device


class _Probe(nn.Module):
    """Holds a module; registered, it would put the student's weights into the plugin's state a second time."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


class SelfEMAPlugin(DistillationPlugin):
    """A minimal momentum self-distillation: the student's output regressed onto an EMA copy's, through a head."""

    name = "test-self-ema"
    teacher_policy = "none"
    unregistered = ("_probe",)

    def __init__(self, config, **runtime):
        super().__init__(config, **runtime)
        self.calls = []
        self._probe = None

    def check_compatibility(self, student):
        self.calls.append(("check", sorted(dict(self.named_parameters())), self.teacher))

    def setup(self, student):
        self.calls.append(("setup", len(student._forward_hooks)))
        self.head = nn.Linear(3, 3)
        self._ema = self.ema_teacher(student)
        self._ema_head = self.ema_teacher(self.head)
        self.set_teacher(self._ema.module)
        self._probe = _Probe(student)

    def attach(self, student, hooks):
        self.calls.append(("attach",))
        hooks.forward_hook(student[0], lambda *_: None)  # a copy made after this would carry the hook

    def forward(self, student, inputs, extras, num_items_in_batch=None):
        out = self.head(student(inputs["x"]))
        with self.teacher_context() as teacher:
            target = self._ema_head.module(teacher(inputs["x"].to(module_device(teacher))))
        loss = (out - target).pow(2).mean()
        return DistillationResult(output={"logits": out}, loss=loss, loss_terms={"mse": loss.detach()})

    def on_step_end(self):
        self._ema.update(0.5)
        self._ema_head.update(0.5)


@pytest.fixture
def self_ema(monkeypatch):
    monkeypatch.setitem(registry._registry, SelfEMAPlugin.name, SelfEMAPlugin)  # removed again after the test
    return SelfEMAPlugin.name


def _student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3))


def test_wrap_checks_then_sets_up_then_attaches(self_ema):
    student = _student()
    wrapped = vlmdistill.wrap(student, plugin=self_ema)
    plugin = wrapped.plugin
    # check_compatibility saw nothing built yet; setup ran on the student before any hook; attach came last
    assert plugin.calls == [("check", [], None), ("setup", 0), ("attach",)]
    assert plugin.student is student
    assert len(student[0]._forward_hooks) == 1 and not plugin._ema.module[0]._forward_hooks  # copied unhooked
    # the head built in setup is the plugin's: trained, saved as plugin state, its 0-dim-free keys as usual
    assert {n for n, _ in wrapped.named_parameters()} == {"student.0.weight", "student.0.bias",
                                                           "plugin.head.weight", "plugin.head.bias"}


def test_unregistered_references_stay_out_of_modules_and_state(self_ema):
    wrapped = vlmdistill.wrap(_student(), plugin=self_ema)
    plugin = wrapped.plugin
    assert isinstance(plugin._probe, _Probe)
    module_ids = {id(m) for m in wrapped.modules()}
    assert id(plugin._probe) not in module_ids and id(plugin.teacher) not in module_ids
    assert all(not k.startswith("plugin._probe") for k in wrapped.state_dict())
    assert sorted(k for k in plugin.state_dict() if not k.startswith("hidden.")) == ["global_step", "head.bias",
                                                                                      "head.weight"]
    # reassigning keeps it unregistered
    plugin._probe = _Probe(nn.Linear(1, 1))
    assert "_probe" not in plugin._modules and all("_probe" not in k for k in plugin.state_dict())


def test_set_and_release_teacher(self_ema):
    wrapped = vlmdistill.wrap(_student(), plugin=self_ema)
    plugin = wrapped.plugin
    other = nn.Linear(4, 3)
    plugin.set_teacher(other)
    assert plugin.teacher is other and not other.training
    assert not any(p.requires_grad for p in other.parameters())
    assert not plugin.teacher_is_student_base
    plugin.release_teacher()
    assert plugin.teacher is None
    with pytest.raises(RuntimeError, match="has no teacher"):
        with plugin.teacher_context():
            pass


def test_ema_teachers_follow_their_source_device(self_ema):
    wrapped = vlmdistill.wrap(_student(), plugin=self_ema)
    plugin = wrapped.plugin
    wrapped.to("meta")  # the teachers are unregistered: .to() does not reach them
    assert module_device(plugin._ema.module).type == "cpu"
    with plugin.teacher_context() as teacher:
        assert module_device(teacher).type == "meta"
        assert module_device(plugin._ema_head.module).type == "meta"


def test_ema_update_follows_the_source_and_averages(self_ema):
    wrapped = vlmdistill.wrap(_student(), plugin=self_ema).train()
    plugin = wrapped.plugin
    before = {n: p.clone() for n, p in plugin.teacher.named_parameters()}
    with torch.no_grad():
        for p in wrapped.student.parameters():
            p.add_(1.0)
    wrapped.step_end()
    student = dict(wrapped.student.named_parameters())
    for name, value in plugin.teacher.named_parameters():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * student[name].detach())


def _rank_worker(rank, store, out):
    torch.set_num_threads(1)
    registry._registry[SelfEMAPlugin.name] = SelfEMAPlugin  # a spawned process starts without it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        wrapped = vlmdistill.wrap(_student(seed=rank), plugin=SelfEMAPlugin.name)  # different copies on purpose
        plugin = wrapped.plugin
        wrapped.eval()
        wrapped(x=torch.ones(2, 4))  # evaluation: no collective, each rank keeps its own copy
        evaluated = [p.clone() for p in plugin.teacher.parameters()]
        wrapped.train()
        wrapped(x=torch.ones(2, 4))  # the first training forward takes rank 0's copies
        torch.save({"eval": evaluated, "teacher": [p.clone() for p in plugin.teacher.parameters()],
                    "head": [p.clone() for p in plugin._ema_head.module.parameters()]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ema_teachers_equal_rank_zero_on_every_rank(tmp_path):
    out = str(tmp_path / "teachers.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    first, second = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert not all(torch.equal(a, b) for a, b in zip(first["eval"], second["eval"]))
    for key in ("teacher", "head"):
        for a, b in zip(first[key], second[key]):
            assert torch.equal(a, b)
    for a, b in zip(first["eval"], first["teacher"]):
        assert torch.equal(a, b)  # rank 0's own copy, untouched


@pytest.mark.parametrize("plugin", ["msd"])  # ccd's heads compute in fp32 by design (`.float()` tokens)
def test_ema_teachers_follow_a_cast_of_the_wrapper(plugin):
    """`wrapped.to(torch.float64)` casts the student; the unregistered EMA copies follow it at the next teacher
    run, so the float64 forward works."""
    from contract_cases import load_case

    case = load_case(plugin)
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student), **case.config,
                              **case.runtime)
    wrapped.to(torch.float64)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in case.batch(4).items()}
    out = wrapped(**batch)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float64
    emas = wrapped.plugin._ema_teachers
    assert emas and all(p.dtype == torch.float64 for ema in emas for p in ema.module.parameters())
