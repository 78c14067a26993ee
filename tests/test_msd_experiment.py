"""Smoke tests of `vlmdistill demo msd` and of the msd benchmark (tiny settings)."""

import json

import pytest

from vlmdistill.plugins.msd import MSDPlugin


@pytest.mark.slow
def test_demo_quick_writes_every_run(tmp_path, capsys):
    from vlmdistill.eval.experiments.msd import main

    assert MSDPlugin.demo == "vlmdistill.eval.experiments.msd:main"
    kinds = ["clip-b", "clip-b-accum", "msd", "clip-Mb"]
    argv = ["--quick", "--seeds", "0", "1", "--output-dir", str(tmp_path), "--workers", "2", "--runs", *kinds]
    assert main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [(r["run"], r["seed"]) for r in report["runs"]] == [(k, s) for k in kinds for s in (0, 1)]
    for run in report["runs"]:
        assert run["split"] == "test"
        assert all(0.0 <= run[m] <= 1.0 for m in ("i2t_r1", "t2i_r1", "probe_auc", "probe_acc"))
        assert run["saved_activations_mb"] > 0
    saved = {r["run"]: r["saved_activations_mb"] for r in report["runs"]}
    # The memory claim in miniature: MSD's micro-batch holds what the small batch holds, not the big batch.
    assert saved["msd"] < 0.5 * saved["clip-Mb"]
    by = {(r["run"], r["seed"]): r for r in report["runs"]}
    test = next(t for t in report["paired_tests"] if t["arm"] == "msd" and t["baseline"] == "clip-b-accum"
                and t["metric"] == "i2t_r1")
    assert test["mean_diff"] == pytest.approx(sum(by["msd", s]["i2t_r1"] - by["clip-b-accum", s]["i2t_r1"]
                                                  for s in (0, 1)) / 2)
    table = (tmp_path / "results.md").read_text()
    assert "MSD, 8 x 4" in table and "paired t" in table and "image→text R@1" in capsys.readouterr().out
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table


@pytest.mark.slow
def test_sweep_measures_on_the_validation_split_only(tmp_path):
    from vlmdistill.eval.experiments.msd import SWEEP, main

    assert main(["--quick", "--sweep", "--seeds", "0", "--output-dir", str(tmp_path), "--workers", "2"]) == 0
    report = json.loads((tmp_path / "msd_sweep.json").read_text())
    assert {r["split"] for r in report["runs"]} == {"val"} and {r["run"] for r in report["runs"]} == {"msd"}
    assert len(report["grid"]) == len(SWEEP["alpha"]) * len(SWEEP["momentum"])
    assert report["best"] == max(report["grid"], key=lambda row: row["i2t_r1"])


def test_benchmark_quick_reports_ratios(tmp_path):
    from vlmdistill.eval.bench.bench_msd import main, vit_b16_shapes

    assert 85e6 < sum(__import__("math").prod(s) for s in vit_b16_shapes()) < 87e6   # ViT-B/16 sized
    assert main(["--quick", "--threads", "1", "--accumulation", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert "fused speed-up" in (tmp_path / "results.md").read_text()
    ema, step = result["ema"], result["steps"][0]
    # The printed ratios are the ratios of the timings it recorded (not constants), and the report says them
    fused, albef = ema["median_ms"]["fused (EMATeacher.update)"], ema["median_ms"]["per-parameter loop, ALBEF style"]
    assert ema["speedup_vs_albef_loop"] == pytest.approx(albef / fused)
    assert step["ratio"] == pytest.approx(step["msd_ms_per_micro_batch"] / step["plain_ms_per_micro_batch"])
    assert step["accumulation"] == 2
    assert f"ratio {step['ratio']:.2f}x" in (tmp_path / "results.md").read_text()
