"""CCD losses: one softmax in the segmentation loss, the cross-view DINO loss, the centre and the EMA schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdistill.plugins.ccd.heads import DINOHead
from vlmdistill.plugins.ccd.losses import (
    TeacherCentre,
    cross_view_distillation_loss,
    segmentation_loss,
    teacher_momentum,
)


def test_segmentation_loss_applies_one_softmax():
    logits = torch.randn(2, 2, 8, 16) * 4
    target = torch.rand(2, 8, 16) > 0.5
    log_p = logits.log_softmax(1)
    expected = -log_p.gather(1, target.long().unsqueeze(1)).mean()
    assert torch.allclose(segmentation_loss(logits, target), expected, atol=1e-6)
    # The original's softmax-then-cross_entropy is a different (flattened) loss: make sure that is not what runs.
    double = F.cross_entropy(logits.softmax(1), target.long())
    assert not torch.allclose(segmentation_loss(logits, target), double, atol=1e-3)
    # Confident correct logits: one softmax gives ~0 loss; a second softmax cannot go below log(1 + e^-1).
    sure = torch.where(target.unsqueeze(1), torch.tensor([-20.0, 20.0]).view(1, 2, 1, 1),
                       torch.tensor([20.0, -20.0]).view(1, 2, 1, 1))
    assert segmentation_loss(sure, target) < 1e-6
    assert F.cross_entropy(sure.softmax(1), target.long()) > math.log(1 + math.exp(-1)) - 1e-6


def _loss(s_r, s_i, t_r, t_i, c, idx, b):
    return cross_view_distillation_loss(s_r, s_i, t_r, t_i, c, idx, b, student_temperature=0.1,
                                        teacher_temperature=0.04)


def test_cross_view_loss_matches_the_formula():
    torch.manual_seed(0)
    n, k = 5, 7
    s_r, s_i, t_r, t_i = (torch.randn(n, k) for _ in range(4))
    c = torch.randn(k) * 0.1
    idx = torch.tensor([0, 0, 0, 2, 2])  # image 1 has no characters
    p = lambda t: ((t - c) / 0.04).softmax(-1)  # noqa: E731
    q = lambda s: (s / 0.1).log_softmax(-1)  # noqa: E731
    per = 0.5 * (-(p(t_r) * q(s_i)).sum(-1) - (p(t_i) * q(s_r)).sum(-1))
    expected = (per[:3].mean() + per[3:].mean()) / 3
    assert torch.allclose(_loss(s_r, s_i, t_r, t_i, c, idx, 3), expected, atol=1e-6)
    # same-view pairs are never compared: swapping the student's views changes the loss
    assert not torch.allclose(_loss(s_i, s_r, t_r, t_i, c, idx, 3), expected)


def test_cross_view_loss_sums_over_images_so_micro_batches_add_up():
    torch.manual_seed(1)
    k = 6
    rows = [torch.randn(7, k) for _ in range(4)]
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    c = torch.zeros(k)
    whole = _loss(*rows, c, idx, 4)
    first = _loss(*(r[:3] for r in rows), c, idx[:3], 2)
    second = _loss(*(r[3:] for r in rows), c, idx[3:] - 2, 2)
    assert torch.allclose(whole, (first + second) / 2, atol=1e-6)


def test_empty_character_set_gives_zero_loss():
    empty = torch.zeros(0, 4)
    assert _loss(empty, empty, empty, empty, torch.zeros(4), torch.zeros(0, dtype=torch.long), 2) == 0


def test_centre_moves_once_per_step_with_the_mean_of_the_step():
    centre = TeacherCentre(3)
    centre.value.fill_(1.0)
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    centre.observe(a)
    centre.observe(b)
    assert torch.equal(centre.value, torch.ones(3))  # unchanged within the step
    centre.update(0.9)
    mean = torch.cat([a, b]).mean(0)
    assert torch.allclose(centre.value, 0.9 * torch.ones(3) + 0.1 * mean)
    assert centre.pending_count == 0 and centre.pending_sum.abs().sum() == 0
    before = centre.value.clone()
    centre.update(0.9)  # a step without characters leaves it alone
    assert torch.equal(centre.value, before)


def test_centre_split_equals_one_batch():
    x = torch.randn(10, 5)
    one, two = TeacherCentre(5), TeacherCentre(5)
    one.observe(x)
    two.observe(x[:4])
    two.observe(x[4:])
    one.update(0.9)
    two.update(0.9)
    assert torch.allclose(one.value, two.value, atol=1e-7)


@pytest.mark.parametrize("step, expected", [(0, 0.9995), (50, 0.99975), (100, 1.0), (150, 1.0)])
def test_teacher_momentum_cosine_schedule(step, expected):
    assert teacher_momentum(step, 100, 0.9995) == pytest.approx(expected, abs=1e-12)


def test_teacher_momentum_rises_monotonically():
    values = [teacher_momentum(s, 1000, 0.996) for s in range(0, 1001, 50)]
    assert values == sorted(values) and values[0] == pytest.approx(0.996)


def test_dino_head_prototypes_are_weight_normalised():
    head = DINOHead(8, out_dim=32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_gain.requires_grad
    assert torch.allclose(head.prototypes().norm(dim=1), torch.ones(32), atol=1e-6)
    head(torch.randn(5, 8)).pow(2).sum().backward()
    assert head.last_direction.grad.abs().sum() > 0 and head.mlp[0].weight.grad.abs().sum() > 0


def test_centre_discards_what_a_skipped_step_observed():
    centre = TeacherCentre(4)
    centre.observe(torch.ones(3, 4))
    centre.discard()
    centre.observe(torch.full((1, 4), 2.0))
    centre.update(0.5)
    torch.testing.assert_close(centre.value, torch.full((4,), 1.0))


def _centre_worker(rank, world, port, rows, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    centre = TeacherCentre(rows.shape[1])
    half = rows.shape[0] // world
    centre.observe(rows[rank * half:(rank + 1) * half])
    centre.update(0.9)
    out[rank] = centre.value.clone()
    dist.destroy_process_group()


@pytest.mark.slow
def test_centre_is_all_reduced_across_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = torch.randn(8, 5)
    out = mp.Manager().dict()
    mp.spawn(_centre_worker, args=(2, port, rows, out), nprocs=2, join=True)
    single = TeacherCentre(5)
    single.observe(rows)
    single.update(0.9)
    for rank in range(2):
        torch.testing.assert_close(out[rank], single.value)


def test_teacher_entropy_is_the_collapse_monitor():
    from vlmdistill.plugins.ccd.losses import teacher_entropy

    k, tau = 16, 0.04
    centre = torch.zeros(k)
    uniform = torch.zeros(4, k)                              # 2 characters x 2 views, all logits equal
    assert teacher_entropy(uniform, centre, torch.tensor([0, 0]), 1, tau) == pytest.approx(math.log(k))
    one_hot = torch.full((4, k), -1.0)
    one_hot[:, 3] = 1.0                                        # every character on prototype 3
    assert teacher_entropy(one_hot, centre, torch.tensor([0, 0]), 1, tau) < 1e-6
    # float64 reference: per character the mean of both views' entropies, averaged per image, then over images
    g = torch.Generator().manual_seed(0)
    logits, c = torch.randn(6, k, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 0, 2])                              # image 1 of 3 has no character
    p = torch.softmax((logits - c) / tau, -1)
    h = -(p * p.log()).sum(-1)
    per_char = (h[:3] + h[3:]) / 2
    expected = ((per_char[0] + per_char[1]) / 2 + per_char[2]) / 3
    got = teacher_entropy(logits.float(), c.float(), idx, 3, tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert teacher_entropy(torch.zeros(0, k), centre, torch.zeros(0, dtype=torch.long), 2, tau) == 0
