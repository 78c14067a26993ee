"""Smoke test of `vlmdistill demo dcclip --quick`: every stage of the experiment runs and reports."""

import json

import pytest


@pytest.mark.slow
def test_quick_demo_writes_results(tmp_path):
    from vlmdistill.eval.experiments.dcclip import main

    assert main(["--quick", "--output-dir", str(tmp_path), "--seeds", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["teacher", "student, from scratch", "student, DC-CLIP",
                                                    "student, DC-CLIP + embedding term"]
    assert "after_stage1" in results["rows"][2] and "after_stage1" not in results["rows"][1]
    for row in results["rows"]:
        assert 0.0 <= row["en"] <= 1.0 and 0.0 <= row["zh"] <= 1.0
    stages = [h["stage"] for h in results["histories"]["arm1_seed0"]]
    assert stages[0] == 1 and stages[-1] == 2
    assert results["rows"][0]["params"] > 4 * results["rows"][1]["params"]
    assert "zero-shot top-1" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table
    # the exported students are plain transformers folders (model + tokenizer)
    from transformers import AutoTokenizer, CLIPModel

    CLIPModel.from_pretrained(tmp_path / "artifacts" / "arm2_seed0")
    AutoTokenizer.from_pretrained(tmp_path / "artifacts" / "arm2_seed0")
