"""Smoke tests of the CCD demo experiment and the `vlmdistill train configs/ccd/demo.yaml` recipe."""

import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_quick_writes_results(tmp_path):
    from vlmdistill.eval.experiments.ccd import main

    assert main(["--quick", "--seeds", "0", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["summary"]) == {f"{p}/{f}/{a}" for p in ("finetune", "characters")
                                      for f in ("0.01", "0.10") for a in ("scratch", "ccd")}
    assert len(result["runs"]) == 8 and result["pretraining"]["log"]
    assert (tmp_path / "ccd_teacher_encoder" / "model.safetensors").is_file()
    assert all(0.0 <= r["char_accuracy"] <= 1.0 for r in result["runs"] if r["protocol"] != "characters")
    assert "CCD teacher encoder" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table


@pytest.mark.slow
def test_demo_recipe_trains_and_exports_the_teacher(tmp_path):
    from vlmdistill.plugins.ccd import CCDViT
    from vlmdistill.recipes import load_recipe, run_recipe

    recipe = load_recipe(os.path.join(REPO, "configs", "ccd", "demo.yaml"), [
        "training.max_steps=2", "training.per_device_train_batch_size=4", "training.save_steps=1",
        "data.kwargs.images=8", "data.kwargs.words=[alpha, beta, gamma, delta]", f"output_dir={tmp_path}"])
    summary = run_recipe(recipe)
    assert summary["global_step"] == 2
    teacher = CCDViT.from_pretrained(os.path.join(summary["final"], "ccd_teacher_encoder"))
    student = CCDViT.from_pretrained(summary["student"])
    assert not torch.equal(teacher.pos_embed, student.pos_embed)  # EMA teacher, not the student
