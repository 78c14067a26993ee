"""The two-source attention benchmark script, on its CPU path (kernel through the Triton interpreter)."""

import json
from types import SimpleNamespace

import pytest
import torch

from vlmdistill.kernels.inputs import check_tensors, normalize_masks
from vlmdistill.kernels.reference import visibility_mask

bench = pytest.importorskip("vlmdistill.eval.bench.bench_kv_share_attention")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the benchmark")


def small_args(**kw):
    args = dict(batch=2, tokens_per_batch=0, visual_min=9, visual_max=30, prefix=5, q_heads=6, kv_heads=2,
                head_dim=32, seed=0, sweep=False)
    return SimpleNamespace(**{**args, **kw})


def test_useful_work_count_matches_the_mask():
    layout = bench.make_layout(120, 3, 9, 60, 5, seed=1)
    w = bench.make_workload(layout, 2, 1, 32, torch.float32, torch.device("cpu"), seed=1)
    shapes = check_tensors(w.q_text, w.k_shared, w.v_shared, w.k_own, w.v_own)
    visible = visibility_mask(normalize_masks(shapes, "cpu", **w.masks))
    assert int(visible.sum()) == layout.visible_pairs()


def test_compact_inputs_are_the_full_length_tensors_at_visual_and_text_positions():
    layout = bench.make_layout(64, 2, 9, 30, 5, seed=2)
    w = bench.make_workload(layout, 2, 1, 32, torch.float32, torch.device("cpu"), seed=2)
    for b, n_visual in enumerate(layout.n_visual):
        visual = slice(layout.prefix, layout.prefix + n_visual)
        assert torch.equal(w.k_shared[b, :, :n_visual], w.k_student[b, :, visual])
        text = torch.cat([torch.arange(layout.prefix), torch.arange(layout.prefix + n_visual, layout.length)])
        assert torch.equal(w.v_own[b, :, :len(text)], w.v_teacher[b, :, text])
        assert torch.equal(w.masks["pos_q"][b, :len(text)].long(), text)


def test_cpu_smoke_checks_every_method_and_writes_reports(tmp_path):
    assert bench.main(["--out", str(tmp_path), "--lengths", "72", "--q-heads", "6", "--kv-heads", "2",
                       "--head-dim", "32"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["gpu"] is False and result["matmul_tflops"] is None and result["fused_correct"]
    checks = result["lengths"][0]["correctness"]
    assert set(checks) == {"fused", "a_merge_sdpa", "a_merge_causal", "b_two_sdpa", "c_flex"}
    assert all(c["ok"] for c in checks.values()), checks
    assert "timings" not in result["lengths"][0]
    assert "no GPU timing was taken" in (tmp_path / "results.md").read_text()


def test_a_wrong_baseline_is_reported_not_fatal():
    layout = bench.make_layout(48, 2, 9, 20, 5, seed=3)
    w = bench.make_workload(layout, 2, 1, 32, torch.float32, torch.device("cpu"), seed=3)

    def broken(_):
        raise RuntimeError("unsupported here")

    results = bench.check_methods(w, {"fused": bench.run_fused, "zeros": lambda x: torch.zeros_like(x.q_text),
                                      "broken": broken}, tolerance=1e-4)
    assert results["fused"]["ok"]
    assert not results["zeros"]["ok"] and results["zeros"]["max_rel_error"] == pytest.approx(1.0)
    assert not results["broken"]["ok"] and "unsupported here" in results["broken"]["error"]


def test_timing_and_report_code_paths_run(tmp_path):
    """The GPU-only part (timings, ratios, targets, report), driven by a wall-clock timer on the CPU."""
    record = bench.benchmark_length(56, small_args(sweep=True), torch.device("cpu"), torch.float32,
                                    timer=bench.WallClockTimer(repeats=1), matmul_rate=1.0)
    timings = record["timings"]
    assert {"fused", "a_merge_sdpa", "b_two_sdpa", "c_flex"} <= set(timings)
    assert all("median_ms" in t for t in timings.values()), timings
    assert timings["a_merge_sdpa"]["fused_speedup"] > 0 and "fraction_of_matmul_rate" in timings["fused"]
    assert len(record["fused_config_sweep"]) >= 4
    as_4k = dict(record, length=4096)
    targets = bench.evaluate_targets([as_4k], matmul_rate=1.0)
    assert set(targets) == {"speedup_vs_a_merge_sdpa_at_4096", "speedup_vs_b_two_sdpa"}
    result = {"gpu": False, "environment": {"device": "cpu", "torch": "x", "triton": "y", "flash_attn": False},
              "dtype": "float32", "q_heads": 6, "kv_heads": 2, "head_dim": 32, "matmul_tflops": 1.0,
              "lengths": [as_4k], "targets": targets, "fused_correct": True}
    bench.write_report(tmp_path, result)
    markdown = (tmp_path / "results.md").read_text()
    assert "## Timings" in markdown and "## Targets" in markdown and "## Fused kernel configurations" in markdown
