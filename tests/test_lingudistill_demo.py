"""The LinguDistill demo experiment, the toy VLM it builds, its report, and the benchmark script."""

from __future__ import annotations

import json

import pytest
import torch

from vlmdistill.eval.experiments import lingudistill as experiment


def test_recovery_is_measured_against_plain_fine_tuning():
    original = {"perplexity": 100.0, "next_token_accuracy": 0.20, "digit_accuracy": 0.1}
    rows = [{"seed": 0, "arm": "finetuned", "perplexity": 300.0, "next_token_accuracy": 0.10, "digit_accuracy": 0.90},
            {"seed": 0, "arm": "lingudistill", "perplexity": 150.0, "next_token_accuracy": 0.18,
             "digit_accuracy": 0.92}]
    summary = experiment.summarise(original, rows)
    assert summary["recovery_lingudistill"]["perplexity"]["mean"] == pytest.approx(0.75)
    assert summary["recovery_lingudistill"]["next_token_accuracy"]["mean"] == pytest.approx(0.8)
    assert summary["digit_accuracy_change_lingudistill"]["mean"] == pytest.approx(0.02)


def test_toy_llava_starts_as_the_language_model():
    """The VLM built from an LM scores text exactly like the LM (over the LM's vocabulary)."""
    from vlmdistill.eval.experiments.toy_vlm import llama_lm, llava_from_parts, vision_encoder

    lm = llama_lm(50, layers=2, hidden=32, seed=3).eval()
    vlm = llava_from_parts(lm, vision_encoder(hidden=16, layers=1), image_token_id=50).eval()
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        got = experiment.TextVocabulary(vlm, 50)(input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_quick_demo_writes_its_report(tmp_path):
    assert experiment.main(["--smoke", "--seeds", "0", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {r["arm"] for r in result["runs"]} == {"finetuned", "lingudistill"}
    for row in result["runs"]:
        assert row["perplexity"] > 1 and 0 <= row["digit_accuracy"] <= 1
        if row["arm"] == "lingudistill":
            assert "distill/kd" in row["final_log"]
    assert "recovery" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table


@pytest.mark.slow
def test_benchmark_runs_and_reports_ratios(tmp_path, capsys):
    from vlmdistill.eval.bench import bench_lingudistill as bench

    bench.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--batch", "2",
                "--seq", "36", "--steps", "1", "--warmup", "1", "--no-memory", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    ratio = result["timing"]["ratio"]
    assert ratio["plain"]["median"] == 1.0
    assert {"lingudistill text-only (torch)", "lingudistill full-length (reference)"} <= set(ratio)
    assert result["floor"]["floor"] > 1.0
    out = capsys.readouterr().out
    assert "x plain" in out and "floor from the shapes" in out
