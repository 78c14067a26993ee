"""`make gpu-check` without CUDA: the dry mode runs every section's code at tiny sizes (the kernel through the
Triton interpreter, torch.compile with the eager backend), writes results.json / results.md and claims no GPU
number; it needs none of open_clip, webdataset, scikit-*, datasets; a missing piece is named, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry mode is what runs without CUDA")

#: what the check must not need (absent from the GPU machines it is written for)
NOT_NEEDED = ("open_clip", "webdataset", "sklearn", "skimage", "datasets", "matplotlib")


def _run(tmp_path, *args, blocked=NOT_NEEDED):
    code = ("import sys\n"
            f"for name in {tuple(blocked)!r}:\n    sys.modules[name] = None  # import fails, as if not installed\n"
            "from vlmdistill.eval.gpu_check.run import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPU_CHECK_OUT": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, env=env)


def test_dry_run_covers_every_section_without_the_unneeded_packages(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry"] is True
    sections = results["sections"]
    assert list(sections) == ["environment", "kernel_correctness", "steps", "kernel_benchmark", "steps_compiled"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    versions = sections["environment"]["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] and versions["transformers"]
    kernel = sections["kernel_correctness"]
    assert kernel["compiled"] is False and kernel["cases"] and all(c["ok"] for c in kernel["cases"])
    assert {c["dtype"] for c in kernel["cases"]} == {"float32", "float16", "bfloat16"}
    for name in ("steps", "steps_compiled"):
        runs = sections[name]["runs"]
        assert set(runs) == {"lingudistill tiny", "kd tiny"}
        for run in runs.values():
            assert run["floor"]["floor"] > 1.0 and len(run["timing"]["arms"]) >= 2
    arms = sections["steps"]["runs"]["lingudistill tiny"]["timing"]["arms"]
    assert arms == ["plain", "lingudistill text-only (torch)", "lingudistill text-only (triton)"]
    assert "teacher_pass" in sections["steps"]["runs"]["lingudistill tiny"]
    bench = sections["kernel_benchmark"]
    assert bench["fused_correct"] is True and bench["gpu"] is False and not bench["targets"]
    report = (tmp_path / "results.md").read_text()
    assert "DRY RUN" in report and "floor" in report
    assert "no GPU numbers" in proc.stdout


def test_a_missing_piece_is_named_and_its_sections_skip(tmp_path):
    proc = _run(tmp_path, "--sections", "environment,steps", blocked=NOT_NEEDED + ("transformers",))
    assert proc.returncode == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sections"]["environment"]["status"] == "ok"
    steps = results["sections"]["steps"]
    assert steps["status"] == "missing" and "transformers cannot be imported" in steps["reason"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "steps skipped: transformers cannot be imported" in proc.stdout


def test_unknown_section_is_refused_with_the_choices(tmp_path):
    proc = _run(tmp_path, "--sections", "steps,speed")
    assert proc.returncode == 2 and "unknown sections ['speed']" in proc.stderr and "kernel_correctness" in proc.stderr
