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
    # configs/kd/demo.yaml trains on what the demo saved (its teacher and tokenizer); here at the quick scale.
    from transformers import AutoTokenizer

    from vlmdistill.recipes import load_recipe, run_recipe

    vocab = len(AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")))
    recipe = load_recipe("configs/kd/demo.yaml")
    assert recipe.teacher.path == f"runs/demo-kd/teacher-500x32-v{vocab}"   # the full demo's teacher folder
    assert recipe.student.kwargs["vocab_size"] == vocab
    quick = load_recipe("configs/kd/demo.yaml", [
        f"teacher.path={tmp_path}/teacher-40x16-v{vocab}", f"data.kwargs.tokenizer={tmp_path}/tokenizer",
        f"eval_data.kwargs.tokenizer={tmp_path}/tokenizer", "training.max_steps=3", "training.logging_steps=1",
        f"output_dir={tmp_path}/recipe"])
    summary = run_recipe(quick)
    assert summary["global_step"] == 3
    assert any("distill/kd" in entry for entry in summary["log_history"])
