"""Each demo's figure, drawn from a small results object of the demo's own shape (no demo is run here)."""

import dataclasses
import json

import pytest
from PIL import Image

from vlmdistill.eval.experiments import dcclip, lingudistill, msd, plots


def _bars(ax):
    return [round(p.get_height(), 6) for p in ax.patches]


def _dots(ax):
    return sorted(round(float(y), 6) for line in ax.lines if line.get_marker() == "o" for y in line.get_ydata())


def _check_png(path):
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 500 and png.size[1] > 250


def test_kd_figure(tmp_path):
    runs = [{"seed": s, "arm": arm, "perplexity": p, "next_token_accuracy": a}
            for s, (arm, p, a) in enumerate([("plain", 240.0, 0.20), ("plain", 250.0, 0.22),
                                             ("kd α=0.9", 160.0, 0.30), ("kd α=0.9", 162.0, 0.31)])]
    summary = {"plain": {"perplexity_mean": 245.0, "perplexity_std": 7.07, "accuracy_mean": 0.21,
                         "accuracy_std": 0.014},
               "kd α=0.9": {"perplexity_mean": 161.0, "perplexity_std": 1.41, "accuracy_mean": 0.305,
                            "accuracy_std": 0.007}}
    result = {"setting": {"student": "Llama 2x64", "teacher": "Llama 4x128"}, "runs": runs, "summary": summary,
              "teacher": {"perplexity": 90.0, "next_token_accuracy": 0.4}}
    figure = plots.plot_kd(result, str(tmp_path / "results.png"))
    _check_png(tmp_path / "results.png")
    ppl, acc = figure.axes
    assert _bars(ppl) == [245.0, 161.0] and _bars(acc) == [21.0, 30.5]  # accuracy in percent
    assert _dots(ppl) == [160.0, 162.0, 240.0, 250.0]
    assert ppl.lines[-1].get_ydata()[0] == 90.0 and ppl.get_legend().get_texts()[0].get_text() == "teacher"


def test_lingudistill_figure_from_its_own_summary(tmp_path):
    original = {"perplexity": 20.0, "next_token_accuracy": 0.5, "digit_accuracy": 0.1}
    rows = []
    for seed in (0, 1):
        rows.append({"seed": seed, "arm": "finetuned", "perplexity": 40.0 + seed, "next_token_accuracy": 0.40,
                     "digit_accuracy": 0.90})
        rows.append({"seed": seed, "arm": "lingudistill", "perplexity": 25.0 + seed, "next_token_accuracy": 0.47,
                     "digit_accuracy": 0.91})
    result = {"setting": {"alpha": 0.5, "seeds": [0, 1]}, "original": original,
              "summary": lingudistill.summarise(original, rows)}
    figure = plots.plot_lingudistill(result, str(tmp_path / "results.png"))
    _check_png(tmp_path / "results.png")
    ppl, _, digits, recovery = figure.axes
    assert _bars(ppl) == [40.5, 25.5] and _bars(digits) == [90.0, 91.0]
    expected = result["summary"]["recovery_lingudistill"]["perplexity"]["mean"]  # (40.5-25.5)/(40.5-20) = 73 %
    assert _bars(recovery) == [round(100 * expected, 6)] and abs(expected - 15 / 20.5) < 0.01


def test_dcclip_figure_from_its_own_summary(tmp_path):
    rows = [{"model": "teacher", "seed": 1000, "params": 10, "en": 0.95, "zh": 0.94}]
    for seed in (0, 1, 2):
        rows.append({"model": "student, from scratch", "seed": seed, "params": 5, "en": 0.85 + 0.01 * seed,
                     "zh": 0.84})
        rows.append({"model": "student, DC-CLIP", "seed": seed, "params": 5, "en": 0.88, "zh": 0.87 + 0.01 * seed})
    results = {"rows": rows, "summary": dcclip._summarise(rows)}
    figure = plots.plot_dcclip(results, str(tmp_path / "results.png"))
    _check_png(tmp_path / "results.png")
    en, zh = figure.axes
    assert _bars(en) == [95.0, 86.0, 88.0] and _bars(zh) == [94.0, 84.0, 88.0]
    assert [t.get_text() for t in en.get_xticklabels()] == ["teacher", "from scratch", "DC-CLIP"]
    assert len(_dots(en)) == 7


def test_msd_figure_from_its_own_summary(tmp_path):
    runs = [{"run": kind, "seed": seed, "i2t_r1": 0.9 + 0.01 * i, "t2i_r1": 0.5, "probe_acc": 0.8, "probe_auc": 0.9,
             "saved_activations_mb": 10.0 * (1 + (kind == "clip-Mb")), "peak_rss_mb": 1.0, "train_seconds": 1.0,
             "train_cpu_seconds": 1.0}
            for i, kind in enumerate(msd.RUN_KINDS) for seed in (0, 1)]
    summary = msd.summarise(runs)
    report = {"settings": dataclasses.asdict(msd.Settings()), "runs": runs,
              "summary": {k: {m: list(v) for m, v in d.items()} for k, d in summary.items()}}
    report = json.loads(json.dumps(report))  # as read back from results.json
    figure = plots.plot_msd(report, str(tmp_path / "results.png"))
    _check_png(tmp_path / "results.png")
    retrieval, _, memory = figure.axes
    assert _bars(retrieval) == [90.0, 91.0, 92.0, 93.0, 94.0, 95.0]
    assert _bars(memory) == [10.0, 10.0, 10.0, 20.0, 10.0, 10.0]


def test_ccd_figure(tmp_path):
    runs, summary = [], {}
    for protocol in ("finetune", "characters"):
        for fraction in (0.01, 0.1):
            for arm in ("scratch", "ccd"):
                word = None if protocol == "characters" else 0.1 + fraction
                runs += [{"protocol": protocol, "labels": fraction, "init": arm, "seed": s, "word_accuracy": word,
                          "char_accuracy": 0.5 + fraction} for s in (0, 1)]
                entry = {"char_accuracy": 0.5 + fraction, "char_accuracy_std": 0.0}
                if word is not None:
                    entry.update(word_accuracy=word, word_accuracy_std=0.0)
                summary[f"{protocol}/{fraction:.2f}/{arm}"] = entry
    result = {"setting": {"label_fractions": [0.01, 0.1]}, "runs": runs, "summary": summary}
    figure = plots.plot_ccd(result, str(tmp_path / "results.png"))
    _check_png(tmp_path / "results.png")
    words, chars = figure.axes
    assert _bars(words) == [11.0, 11.0, 20.0, 20.0] and _bars(chars) == [51.0, 51.0, 60.0, 60.0]


def test_redraw_from_a_saved_results_file(tmp_path):
    original = {"perplexity": 20.0, "next_token_accuracy": 0.5, "digit_accuracy": 0.1}
    rows = [{"seed": 0, "arm": "finetuned", "perplexity": 40.0, "next_token_accuracy": 0.4, "digit_accuracy": 0.9}]
    result = {"setting": {"alpha": 0.5, "seeds": [0]}, "original": original,
              "summary": lingudistill.summarise(original, rows)}
    (tmp_path / "results.json").write_text(json.dumps(result))
    assert plots.main(["lingudistill", str(tmp_path / "results.json")]) == 0
    _check_png(tmp_path / "results.png")
    with pytest.raises(SystemExit):  # argparse names the valid demos
        plots.main(["nope", str(tmp_path / "results.json")])
