import json

import pytest

from vlmdistill.cli import main


@pytest.mark.slow
def test_kd_demo_quick_run_writes_results(tmp_path):
    assert main(["demo", "kd", "--output-dir", str(tmp_path), "--quick", "--seeds", "0", "--alphas", "0.9"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {r["arm"] for r in result["runs"]} == {"plain", "kd α=0.9"}
    for row in result["runs"]:
        assert row["perplexity"] > 1 and 0 <= row["next_token_accuracy"] <= 1
    assert (tmp_path / "results.md").read_text().startswith("| model |")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table
    # A second run reuses the saved teacher instead of training it again.
    assert main(["demo", "kd", "--output-dir", str(tmp_path), "--quick", "--seeds", "0", "--alphas", "0.9"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["teacher"] == result["teacher"]
