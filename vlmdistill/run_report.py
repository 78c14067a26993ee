"""What `vlmdistill train` shows and leaves behind: a progress bar with the current loss terms, every log entry in
`output_dir/log_history.jsonl`, a loss-curve plot per term in `output_dir/plots/`, and a closing table."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from transformers import TrainerCallback

from .errors import MissingDependencyError

logger = logging.getLogger(__name__)

LOG_FILE = "log_history.jsonl"
PLOTS_DIR = "plots"
# Trainer log keys that are not loss terms (the end-of-training entry's keys all start with "train_")
_NOT_TERMS = ("learning_rate", "grad_norm", "epoch", "step", "total_flos")


def loss_terms(entry: dict[str, Any]) -> dict[str, float]:
    """The loss values of one log entry: `loss`, `distill/<term>`, and their `eval_` forms."""
    out = {}
    for key, value in entry.items():
        if key in _NOT_TERMS or key.startswith("train_") or not isinstance(value, (int, float)):
            continue
        name = key[len("eval_"):] if key.startswith("eval_") else key
        if name == "loss" or name.startswith("distill/"):
            out[key] = float(value)
    return out


def _short(key: str) -> str:
    return key.replace("distill/", "")


def plot_loss_curves(log_history: list[dict[str, Any]], directory: str) -> dict[str, str]:
    """One PNG per loss term (x: optimizer step); returns {term: path}."""
    from .plots import new_figure, save_figure

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        for key, value in loss_terms(entry).items():
            if math.isfinite(value):
                series.setdefault(key, []).append((int(entry.get("step", 0)), value))
    paths = {}
    for key, points in series.items():
        figure, (ax,) = new_figure(width=5.0, height=3.0)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(key, fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        paths[key] = save_figure(figure, os.path.join(directory, key.replace("/", "_") + ".png"))
    return paths


def summary_table(log_history: list[dict[str, Any]]) -> str:
    """first / last / lowest value (with its step) of every loss term, as an aligned text table."""
    rows: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        for key, value in loss_terms(entry).items():
            rows.setdefault(key, []).append((int(entry.get("step", 0)), value))
    if not rows:
        return "(no loss was logged)"
    width = max(len(k) for k in rows)
    lines = [f"{'term':<{width}}  {'first':>10}  {'last':>10}  {'lowest':>10}  {'at step':>7}",
             "-" * (width + 45)]
    for key, points in rows.items():
        step, low = min(points, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)
        lines.append(f"{key:<{width}}  {points[0][1]:>10.4g}  {points[-1][1]:>10.4g}  {low:>10.4g}  {step:>7d}")
    return "\n".join(lines)


class RunReport(TrainerCallback):
    """Progress bar (when `progress`), `log_history.jsonl` and loss-curve plots for one training run.

    The log file is rewritten from the Trainer's own history when training begins, so a resumed run keeps
    exactly the entries of the steps it did not redo. Only the main process writes or draws."""

    def __init__(self, output_dir: str, progress: bool = True) -> None:
        self.output_dir, self.progress = output_dir, progress
        self.log_path = os.path.join(output_dir, LOG_FILE)
        self.plots: dict[str, str] = {}
        self._bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as fh:
            for entry in state.log_history:
                fh.write(json.dumps(entry) + "\n")
        if self.progress and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                             dynamic_ncols=True)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        entry = {**logs, "step": state.global_step}
        if "epoch" not in entry and state.epoch is not None:
            entry["epoch"] = state.epoch
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        terms = loss_terms(logs)
        if self._bar is not None and terms:
            self._bar.set_postfix_str("  ".join(f"{_short(k)} {v:.4g}" for k, v in terms.items()), refresh=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if state.is_world_process_zero:
            try:
                self.plots = plot_loss_curves(state.log_history, os.path.join(self.output_dir, PLOTS_DIR))
            except MissingDependencyError as error:  # the run and its logs are complete; only the figures are missing
                logger.warning("loss-curve plots skipped: %s", error)
        return control


def remove_log_printers(trainer) -> None:
    """Drop the Trainer's own progress bar and raw-dict printer (RunReport shows progress instead)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, (PrinterCallback, ProgressCallback)):
            trainer.remove_callback(callback)
