"""Smoke tests of `vlmdistill demo msd` and of the msd benchmark (tiny settings)."""

import json

import pytest

from vlmdistill.plugins.msd import MSDPlugin


@pytest.mark.slow
def test_demo_quick_writes_every_run(tmp_path, capsys):
    from vlmdistill.eval.experiments.msd import RUN_KINDS, main

    assert MSDPlugin.demo == "vlmdistill.eval.experiments.msd:main"
    assert main(["--quick", "--seeds", "0", "--output-dir", str(tmp_path), "--workers", "2"]) == 0
    report = json.loads((tmp_path / "msd_results.json").read_text())
    assert [r["run"] for r in report["runs"]] == list(RUN_KINDS)
    for run in report["runs"]:
        assert 0.0 <= run["zero_shot_acc"] <= 1.0 and 0.0 <= run["probe_auc"] <= 1.0
        assert run["saved_activations_mb"] > 0
    saved = {r["run"]: r["saved_activations_mb"] for r in report["runs"]}
    # The memory claim in miniature: MSD's micro-batch holds what the small batch holds, not the big batch.
    assert saved["msd-b-accum"] < 0.5 * saved["clip-Mb"]
    table = (tmp_path / "msd_results.md").read_text()
    assert "MSD, 8 x 4 accumulation" in table and "zero-shot acc" in capsys.readouterr().out
    assert (tmp_path / "msd_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table


def test_benchmark_quick_reports_ratios(tmp_path):
    from vlmdistill.eval.bench.bench_msd import main, vit_b16_shapes

    assert 85e6 < sum(__import__("math").prod(s) for s in vit_b16_shapes()) < 87e6   # ViT-B/16 sized
    out = tmp_path / "bench.json"
    assert main(["--quick", "--threads", "1", "--accumulation", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ema"]["speedup_vs_albef_loop"] > 0 and result["steps"][0]["ratio"] > 0
