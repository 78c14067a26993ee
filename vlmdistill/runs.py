"""The output folder of a recipe run: which recipe ran there, whether it finished, where to resume.

`output_dir/recipe.json` records the recipe a run was started with. Rerunning into the same folder resumes
only the same recipe (`resume: force` continues a changed one, naming what changed); a finished run
(`run_summary.json`) is reported, not extended; a damaged latest checkpoint is named and the one before it is
used.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import warnings
import zipfile
from typing import Any

from .errors import ConfigError, DataError
from .io import read_json, tensors_metadata, write_json

RECIPE_RECORD = "recipe.json"
RUN_SUMMARY = "run_summary.json"


@dataclasses.dataclass
class RunPlan:
    #: checkpoint folder to resume from (None: start from scratch)
    checkpoint: str | None
    #: the summary of a run that already finished with this recipe (then nothing is trained)
    finished: dict[str, Any] | None = None


def recipe_record(recipe) -> dict[str, Any]:
    """The recipe as JSON values, without `resume` (how to continue is not part of what is trained)."""
    values = json.loads(json.dumps(recipe.to_dict(), default=str))
    values.pop("resume", None)
    return values


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as `key: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out.extend(differences(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def plan_run(recipe, checkpoints_dir: str) -> RunPlan:
    """Decide how a recipe run starts in `recipe.output_dir`, refusing what would mix or lose runs."""
    record_path = os.path.join(recipe.output_dir, RECIPE_RECORD)
    record = recipe_record(recipe)
    if not os.path.isfile(record_path):
        if recipe.resume is True:
            raise ConfigError(f"resume: true, but {recipe.output_dir} holds no run ({RECIPE_RECORD} is absent)")
        os.makedirs(recipe.output_dir, exist_ok=True)
        write_json(record_path, record)
        return RunPlan(checkpoint=None)
    if recipe.resume is False:
        raise ConfigError(f"resume: false, but {recipe.output_dir} already holds a run; delete the folder or choose "
                          "another output_dir (nothing is overwritten)")
    changed = differences(read_json(record_path), record)
    if changed and recipe.resume != "force":
        raise ConfigError(f"{recipe.output_dir} holds a run of a different recipe; changed: {'; '.join(changed)}. "
                          "Use another output_dir, or `resume: force` (--set resume=force) to continue that run "
                          "with this recipe")
    summary_path = os.path.join(recipe.output_dir, RUN_SUMMARY)
    if not changed and os.path.isfile(summary_path):
        return RunPlan(checkpoint=None, finished={**read_json(summary_path), "already_finished": True})
    if changed:  # resume: force — from now on this is the run's recipe
        warnings.warn(f"resume: force — continuing the run in {recipe.output_dir} with changes: {'; '.join(changed)}",
                      stacklevel=2)
        write_json(record_path, record)
        if os.path.isfile(summary_path):
            os.remove(summary_path)
    checkpoint = latest_good_checkpoint(checkpoints_dir)
    if checkpoint is None and recipe.resume is True:
        raise ConfigError(f"resume: true, but {checkpoints_dir} holds no usable checkpoint")
    return RunPlan(checkpoint=checkpoint)


def finish_run(recipe, summary: dict[str, Any]) -> None:
    write_json(os.path.join(recipe.output_dir, RUN_SUMMARY), summary)


def latest_good_checkpoint(checkpoints_dir: str) -> str | None:
    """The newest `checkpoint-N` folder whose files are whole; damaged ones are named in a warning and passed over."""
    found = []
    for path in glob.glob(os.path.join(checkpoints_dir, "checkpoint-*")):
        match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); resuming from the one before it", stacklevel=2)
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None. Checks every file's structure (safetensors
    headers, the zip directory of torch.save files, JSON) without reading the tensors."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "trainer_state.json is missing"
    for file in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if not os.path.isfile(file):
            continue
        try:
            if file.endswith(".safetensors"):
                tensors_metadata(file)
            elif file.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(file):  # torch.save archives: a truncated file loses its central directory
                    pass
            elif file.endswith(".json"):
                read_json(file)
        except (DataError, zipfile.BadZipFile, OSError) as exc:
            return f"{os.path.relpath(file, path)}: {exc}"
    return None
