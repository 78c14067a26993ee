"""Smoke test of `vlmdistill demo dcclip --quick`: every arm of the experiment runs and reports, model selection
reads the validation split only, and the evaluation prompts are unseen in training."""

import json

import pytest


def test_evaluation_templates_are_unseen_in_training():
    from vlmdistill.eval.experiments.dcclip import TEMPLATES, check_templates

    check_templates()
    training = {t for role in ("teacher", "student") for lang in ("en", "zh") for t in TEMPLATES[role][lang]}
    for lang in ("en", "zh"):
        assert len(TEMPLATES["test"][lang]) >= 3 and not set(TEMPLATES["test"][lang]) & training
        assert not set(TEMPLATES["validation"][lang]) & (training | set(TEMPLATES["test"][lang]))


def test_paired_statistics_against_scipy():
    from scipy import stats

    from vlmdistill.eval.experiments.dcclip import paired

    a, b = [0.91, 0.88, 0.90, 0.93, 0.89], [0.87, 0.88, 0.86, 0.90, 0.85]
    got = paired([x - y for x, y in zip(a, b)])
    expected = stats.ttest_rel(a, b)
    assert got["t"] == pytest.approx(expected.statistic) and got["p"] == pytest.approx(expected.pvalue)


@pytest.mark.slow
def test_quick_demo_writes_results(tmp_path):
    from vlmdistill.eval.experiments.dcclip import ARMS, GRID, main

    assert main(["--quick", "--output-dir", str(tmp_path), "--seeds", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["teacher", *(a[0] for a in ARMS)]
    rows = {r["model"]: r for r in results["rows"]}
    assert "after_stage1" in rows["DC-CLIP"] and "after_stage1" not in rows["from scratch"]
    for row in results["rows"]:
        assert 0.0 <= row["en"] <= 1.0 and 0.0 <= row["zh"] <= 1.0
    # model selection: every grid point scored on the validation split, with the validation seeds only
    assert len(results["model_selection"]) == sum(len(g) for g in GRID.values())
    assert results["validation_seeds"] == [100] and results["seeds"] == [0]
    assert results["chosen"]["dcclip_best"] in (results["chosen"]["dcclip"], results["chosen"]["dcclip_emb"])
    # per-stage schedules: the learning rate restarts at the switch, unless the restart is off
    def lrs(name):
        return [(h["stage"], h["lr"]) for h in results["histories"][f"{name} / seed 0"]]

    staged, single = lrs("DC-CLIP + embedding term"), lrs("DC-CLIP + embedding term, one schedule across the stages")
    assert [s for s, _ in staged][0] == 1 and [s for s, _ in staged][-1] == 2
    rises = lambda history: sum(b > a + 1e-12 for (_, a), (_, b) in zip(history, history[1:]))  # noqa: E731
    assert rises(staged) == 1 and rises(single) == 0
    assert {c["arm"] for c in results["comparisons"]} >= {"DC-CLIP", "logit distillation (CLIP-KD style)"}
    assert results["rows"][0]["params"] > 4 * results["rows"][1]["params"]
    assert "zero-shot top-1" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure beside the table
    # the exported models are plain transformers folders (model + tokenizer)
    from transformers import AutoTokenizer, CLIPModel

    CLIPModel.from_pretrained(tmp_path / "artifacts" / "teacher")
    AutoTokenizer.from_pretrained(tmp_path / "artifacts" / "teacher")
