"""Shared machinery of the step benchmarks: interleaved timing of arms in one process, peak memory per arm, and
the report lines.

Timing: every repetition runs one step of every arm, in an order that rotates from one repetition to the next,
and each arm's ratio is taken against the plain arm *of the same repetition*; the median of those paired ratios
and their range are reported. Wall time is what a user waits; the process's CPU time is reported beside it because
on a machine shared with other jobs it is far less noisy (a descheduled thread does not count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, dtype: str | None):
    """bf16/fp16 autocast as the HF Trainer's `bf16=True` uses it; a null context for None."""
    if not dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@dataclasses.dataclass
class Arm:
    """One arm's step, with set-up and tear-down (e.g. wrap / unwrap) that run outside the timed region."""

    run: Callable[[], None]
    enter: Callable[[], None] | None = None
    exit: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.enter is not None:
            self.enter()
        try:
            self.run()
        finally:
            if self.exit is not None:
                self.exit()


def time_interleaved(arms: dict[str, Callable[[], None] | Arm], *, steps: int, warmup: int, device: torch.device,
                     baseline: str = "plain", on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run every arm once per repetition (rotating order); per arm: wall and CPU seconds of each measured
    repetition, their medians, and the median / min / max of its per-repetition ratio to `baseline`."""
    arms = {name: arm if isinstance(arm, Arm) else Arm(arm) for name, arm in arms.items()}
    names = list(arms)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for rep in range(warmup + steps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        this = {}
        for name in order:
            arm = arms[name]
            if arm.enter is not None:
                arm.enter()
            try:
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                arm.run()
                sync(device)
                this[name] = (time.perf_counter() - w0, time.process_time() - c0)
            finally:
                if arm.exit is not None:
                    arm.exit()
        if rep >= warmup:
            for name, (w, c) in this.items():
                wall[name].append(w)
                cpu[name].append(c)
            if on_step is not None:
                on_step(rep - warmup, this)
    out = {"arms": names, "wall_s": wall, "cpu_s": cpu, "median_wall_s": {}, "median_cpu_s": {}, "ratio": {},
           "ratio_cpu": {}}
    for name in names:
        out["median_wall_s"][name] = statistics.median(wall[name])
        out["median_cpu_s"][name] = statistics.median(cpu[name])
        out["ratio"][name] = _ratio_stats(wall[name], wall[baseline])
        out["ratio_cpu"][name] = _ratio_stats(cpu[name], cpu[baseline])
    return out


def _ratio_stats(values, base) -> dict:
    ratios = [v / b for v, b in zip(values, base)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def ratio_text(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


# ------------------------------------------------------------------------------------------------------ memory

def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def _entered(arm: Arm):
    if arm.enter is not None:
        arm.enter()
    try:
        yield
    finally:
        if arm.exit is not None:
            arm.exit()


def measure_rss(step: Callable[[], None] | Arm, settle_steps: int = 2) -> dict:
    """Resident memory before a step and the peak during it (bytes), after `settle_steps` steps that let the
    optimizer state and the allocator settle."""
    arm = step if isinstance(step, Arm) else Arm(step)
    for _ in range(settle_steps):
        arm()
    with _entered(arm):
        before = proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:  # resets the peak resident set (VmHWM) of this process
            fh.write("5")
        arm.run()
        return {"before": before * 1024, "peak": proc_status_kib("VmHWM") * 1024}


def rss_in_subprocess(module: str, argv: list[str], arm: str) -> dict:
    """`measure_rss` of one arm in a fresh process (`python -m module *argv --memory-arm arm`), whose last
    output line is that dict as JSON."""
    cmd = [sys.executable, "-m", module, *argv, "--memory-arm", arm]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"memory arm {arm!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_step_peak(step: Callable[[], None] | Arm) -> dict:
    """CUDA bytes allocated before a step (weights, optimizer state, a teacher) and the peak during it."""
    arm = step if isinstance(step, Arm) else Arm(step)
    with _entered(arm):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        arm.run()
        torch.cuda.synchronize()
        return {"before": before, "peak": torch.cuda.max_memory_allocated()}


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def cuda_peak_lines(peaks: dict, teacher_bytes: int, expected_bytes: int) -> list[str]:
    """Report lines for `cuda_step_peak` results (the first arm is the plain one). The teacher's weights are
    resident in the process for every arm, so the distillation's extra is the peak difference plus those
    weights."""
    mb = 1 / 2 ** 20
    baseline = next(iter(peaks))
    plain = peaks[baseline]["peak"]
    lines = []
    for name, p in peaks.items():
        line = f"- CUDA max_memory_allocated during a step, {name}: {p['peak'] * mb:.1f} MiB"
        if name != baseline:
            extra = p["peak"] - plain + teacher_bytes
            line += (f"; extra over plain incl. the teacher's weights {extra * mb:+.1f} MiB (target <= "
                     f"{1.05 * expected_bytes * mb:.1f} MiB: {'met' if extra <= 1.05 * expected_bytes else 'missed'})")
        lines.append(line)
    return lines


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Regional compilation: every decoder / encoder layer compiled on its own (as transformers recommends for
    training); the layers of one stack share the compiled code. Returns how many were compiled."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            module.compile(backend=backend)
            count += 1
    return count
