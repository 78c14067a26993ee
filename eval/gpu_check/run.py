"""`make gpu-check`: every GPU measurement of the project in one command.

    make gpu-check        # python -m vlmdistill.eval.gpu_check --out ${GPU_CHECK_OUT:-runs/gpu-check}

On a CUDA machine (sized for about 8 minutes on one H100 / H200), in this order:
1. environment: card, driver, CUDA, and the versions of python, torch, triton, transformers, accelerate, peft,
   safetensors;
2. kernel_correctness: the Triton two-source kernel compiled (not interpreted) against the float64 reference,
   fp32 / fp16 / bf16, head dims 64 and 128, GQA groups 1 / 3 / 5, key padding, packed documents, forward and
   backward;
3. steps: lingudistill and kd training-step ratios (with the floor from the shapes) and peak
   `max_memory_allocated` at the presets smolvlm-256m and smollm2-360m-vlm, bf16 autocast, lingudistill with
   kernel "torch" and "triton";
4. kernel_benchmark: 1k-8k tokens against masked SDPA on merged K/V, two calls merged by log-sum-exp and compiled
   FlexAttention, TFLOP/s and the card's bf16 matmul rate measured in the same run, and the targets;
5. steps_compiled: the step ratios with the layers compiled by torch.compile.
results.json and results.md are rewritten after every section, so a run cut short keeps what it measured; a
section that would overrun the time budget is skipped and says so.

Without CUDA (or with --dry) it runs a dry mode in seconds: the same code at tiny sizes (kernel through the
Triton interpreter, torch.compile with the eager backend); it checks the plumbing and reports no GPU number.

Needs only torch (with CUDA), triton, transformers, accelerate, peft, safetensors and this package
(`pip install --no-deps --no-build-isolation -e .`); a missing piece is named, and the sections needing it skip.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "accelerate", "peft", "safetensors")
#: the versions the check is written against (the card's machine image); others are reported, not refused
TARGET_VERSIONS = {"torch": "2.11", "triton": "3.6", "transformers": "5.17"}
PRESETS = ("smolvlm-256m", "smollm2-360m-vlm")


class Missing(Exception):
    """A piece the section needs is not installed (the message names it)."""


def _require(*modules: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise Missing(f"{name} cannot be imported ({exc.__class__.__name__}: {exc}); install it to run this "
                          "section") from None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------------ sections

def environment(ctx) -> dict:
    import torch

    versions = {name: _version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    versions["vlmdistill"] = _version("vlmdistill")
    info = {"versions": versions, "dry": ctx.dry,
            "version_notes": [f"{k} {versions[k]} (written against {v})" for k, v in TARGET_VERSIONS.items()
                              if versions.get(k) and not versions[k].startswith(v)]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info.update(device=torch.cuda.get_device_name(0), capability=capability,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count,
                    cuda_runtime=torch.version.cuda, driver=_driver_version())
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}): no CUDA, dry run",
                    cuda_runtime=torch.version.cuda)
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi not available)"


def kernel_correctness(ctx) -> dict:
    _require("triton")
    from . import kernel_check

    return kernel_check.run(ctx.device, dry=ctx.dry)


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step_runs(ctx, compiled: bool) -> dict:
    _require("transformers", "safetensors", "vlmdistill.plugins.lingudistill", "vlmdistill.plugins.kd")
    import torch

    from vlmdistill.eval.bench import bench_kd, bench_lingudistill

    presets = ("tiny",) if ctx.dry else PRESETS
    steps, warmup = ("1", "0") if ctx.dry else (("6", "3") if compiled else ("8", "2"))
    common = ["--autocast", "bfloat16", "--steps", steps, "--warmup", warmup]
    if compiled:
        common += ["--compile", "--compile-backend", "eager" if ctx.dry else "inductor"]
    runs = {}
    for preset in presets:
        for plugin, module in (("lingudistill", bench_lingudistill), ("kd", bench_kd)):
            key = f"{plugin} {preset}"
            estimate = ctx.estimate("steps_compiled" if compiled else "steps") / (2 * len(presets))
            if not ctx.has_time(estimate):
                runs[key] = {"skipped": f"time budget ({ctx.remaining():.0f} s left, about {estimate:.0f} s needed)"}
                continue
            start = time.perf_counter()
            try:
                if plugin == "lingudistill":
                    extra = ["--no-memory"]
                    if not compiled:
                        extra += ["--teacher-pass"] + (["--arms", "plain,torch,triton"] if ctx.has_triton else
                                                       ["--arms", "plain,torch"])
                    elif not ctx.has_triton:
                        extra += ["--kernel", "torch"]
                    args = module.parse_args(["--preset", preset, *common, *extra])
                    result = module.time_arms(args, ctx.device, torch.float32)
                else:
                    args = module.parse_args(["--preset", preset, *common, "--device", ctx.device.type])
                    result = module.run(args, ctx.device)
                result["device"] = ctx.device_name
                result["report"] = module.report(result, args)
                result["seconds"] = round(time.perf_counter() - start, 1)
                runs[key] = result
            except Exception as exc:  # one run failing must not hide the others
                runs[key] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
            finally:
                _free()
            ctx.checkpoint()
    return {"runs": runs}


def steps(ctx) -> dict:
    return _step_runs(ctx, compiled=False)


def steps_compiled(ctx) -> dict:
    return _step_runs(ctx, compiled=True)


def kernel_benchmark(ctx) -> dict:
    _require("triton")
    from vlmdistill.eval.bench import bench_kv_share_attention as bench

    out = ctx.out / "kernel_bench"
    argv = ["--out", str(out), "--no-sweep"]
    argv += ["--smoke", "--lengths", "48", "--batch", "1"] if ctx.dry else ["--rep-ms", "100", "--warmup-ms", "20"]
    code = bench.main(argv)
    result = json.loads((out / "results.json").read_text())
    result["exit_code"] = code
    return result


SECTIONS = {"environment": environment, "kernel_correctness": kernel_correctness, "steps": steps,
            "kernel_benchmark": kernel_benchmark, "steps_compiled": steps_compiled}
#: seconds each section takes on an H100 / H200, roughly (for the time budget)
ESTIMATES = {"environment": 5, "kernel_correctness": 90, "steps": 110, "kernel_benchmark": 120,
             "steps_compiled": 150}


# ------------------------------------------------------------------------------------------------------ driver

class Context:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        import torch

        self.out, self.budget_s, self.dry = out, budget_s, dry
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.device_name = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "CPU (dry run)"
        self.has_triton = importlib.util.find_spec("triton") is not None
        self.results: dict = {"dry": dry, "sections": {}}

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def estimate(self, section: str) -> float:
        return 0.0 if self.dry else ESTIMATES[section]

    def has_time(self, seconds: float) -> bool:
        return self.dry or self.remaining() >= seconds

    def checkpoint(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write(self.out, self.results)


def run_section(ctx: Context, name: str) -> dict:
    if not ctx.has_time(ctx.estimate(name)):
        return {"status": "skipped", "reason": f"time budget: {ctx.remaining():.0f} s left, about "
                                              f"{ctx.estimate(name)} s needed"}
    start = time.perf_counter()
    print(f"gpu-check: {name} ...", flush=True)
    try:
        data = SECTIONS[name](ctx)
        status = "ok" if data.get("ok", True) and not _errors(data) else "failed"
        return {"status": status, "seconds": round(time.perf_counter() - start, 1), **data}
    except Missing as exc:
        print(f"gpu-check: {name} skipped: {exc}", flush=True)
        return {"status": "missing", "reason": str(exc)}
    except Exception as exc:
        print(f"gpu-check: {name} failed: {type(exc).__name__}: {exc}", flush=True)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:800],
                "traceback": traceback.format_exc()[-3000:]}


def _errors(data: dict) -> list[str]:
    return [k for k, v in data.get("runs", {}).items() if "error" in v]


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text("\n".join(markdown(results)) + "\n")


def markdown(results: dict) -> list[str]:
    from . import kernel_check

    sections = results["sections"]
    env = sections.get("environment", {})
    lines = ["# vlmdistill gpu-check", ""]
    if results["dry"]:
        lines += ["**DRY RUN without CUDA: the plumbing at tiny sizes; no number here is a GPU measurement.**", ""]
    if env.get("status") == "ok":
        v = env["versions"]
        lines += [f"Device: {env['device']}" + (f" (compute capability {env['capability']}, {env['memory_gib']} GiB, "
                                                f"{env['multiprocessors']} SMs; driver {env['driver']}, CUDA "
                                                f"{env['cuda_runtime']})" if "driver" in env else ""),
                  "Versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", *PACKAGES, "vlmdistill")), ""]
        lines += [f"Note: {n}" for n in env.get("version_notes", [])]
    lines.append(f"Elapsed: {results.get('elapsed_s', 0)} s")
    for name, section in sections.items():
        if name == "environment":
            continue
        lines += ["", f"## {name}: {section['status']}" + (f" ({section['seconds']} s)" if "seconds" in section
                                                           else ""), ""]
        if section["status"] in ("skipped", "missing"):
            lines.append(section["reason"])
        elif "error" in section:
            lines += [f"error: {section['error']}", "", "```", section.get("traceback", ""), "```"]
        elif name == "kernel_correctness":
            lines += kernel_check.markdown(section)
        elif name == "kernel_benchmark":
            lines += _kernel_bench_lines(section)
        else:
            for key, run in section["runs"].items():
                lines += [f"### {key}", ""]
                if "report" in run:
                    lines += [run["report"], ""]
                else:
                    lines += [run.get("skipped") or f"error: {run.get('error')}", ""]
    return lines


def _kernel_bench_lines(section: dict) -> list[str]:
    lines = []
    if section.get("matmul_tflops"):
        lines.append(f"bf16 matmul rate measured in this run: {section['matmul_tflops']:.1f} TFLOP/s")
    lines += ["", "| length | batch | method | ms | TFLOP/s | fused speed-up | verified |",
              "|---|---|---|---|---|---|---|"]
    for r in section.get("lengths", []):
        timings = r.get("timings")
        if not isinstance(timings, dict):
            correct = ", ".join(f"{m} {'ok' if c['ok'] else 'FAIL'}" for m, c in r["correctness"].items())
            lines.append(f"| {r['length']} | {r['batch']} | correctness only: {correct} | | | | |")
            continue
        for method, t in timings.items():
            if "median_ms" not in t:
                lines.append(f"| {r['length']} | {r['batch']} | {method} | error: {t['error'][:80]} | | | |")
                continue
            speed = f"{t['fused_speedup']:.2f}x" if "fused_speedup" in t else "-"
            lines.append(f"| {r['length']} | {r['batch']} | {method} | {t['median_ms']:.3f} | "
                         f"{t['useful_tflops']:.1f} | {speed} | {'yes' if t['verified'] else 'no'} |")
    if section.get("targets"):
        lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for name, t in section["targets"].items():
            measured = t["measured"] if isinstance(t["measured"], bool) else f"{t['measured']:.3f}"
            lines.append(f"| {name} | >= {t['target']} | {measured} | {'yes' if t['met'] else 'no'} |")
    return lines


def summary(results: dict) -> list[str]:
    """The short table printed last (what a remote run's output tail shows)."""
    lines = ["", "gpu-check summary" + (" (DRY RUN: no GPU numbers)" if results["dry"] else "")]
    for name, section in results["sections"].items():
        lines.append(f"  {name}: {section['status']}" + (f" - {section.get('reason') or section.get('error')}"
                                                         if section["status"] not in ("ok",) else ""))
        if name == "kernel_correctness" and "cases" in section:
            bad = [c for c in section["cases"] if not c["ok"]]
            lines.append(f"    {len(section['cases']) - len(bad)}/{len(section['cases'])} cases within tolerance")
        if name == "kernel_benchmark":
            for target, t in (section.get("targets") or {}).items():
                verdict = "met" if t["met"] else "MISSED"
                lines.append(f"    {target}: {t['measured']} ({verdict}, target {t['target']})")
        for key, run in section.get("runs", {}).items():
            if "timing" in run:
                timing, floor = run["timing"], run["floor"]["floor"]
                ratios = ", ".join(f"{arm} x{timing['ratio'][arm]['median']:.3f}" for arm in timing["arms"][1:])
                lines.append(f"    {key}: {ratios} (floor {floor:.3f})")
            else:
                lines.append(f"    {key}: {run.get('skipped') or run.get('error')}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Every GPU measurement of vlmdistill in one command.")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or "runs/gpu-check"))
    p.add_argument("--dry", action="store_true", help="the dry mode even where CUDA is present")
    p.add_argument("--budget-s", type=float, default=460.0, help="skip sections that would run past this")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu-check needs torch (with CUDA for the measurements): it is not installed", file=sys.stderr)
        return 2
    dry = args.dry or not torch.cuda.is_available()
    if dry and os.environ.get("TRITON_INTERPRET") != "1" and importlib.util.find_spec("triton") is not None:
        # The dry kernel checks run the kernel through the interpreter, which must be set before triton is imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "vlmdistill.eval.gpu_check", *(sys.argv[1:] if argv is None
                                                                                      else argv)], env=env)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        print(f"gpu-check: unknown sections {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    if dry:
        print("gpu-check: no CUDA device (or --dry): dry run at tiny sizes, checking the plumbing; no GPU numbers",
              flush=True)
    ctx = Context(args.out, args.budget_s, dry)
    for name in names:
        ctx.results["sections"][name] = run_section(ctx, name)
        ctx.checkpoint()
    print("\n".join(summary(ctx.results)))
    print(f"gpu-check: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    statuses = [s["status"] for s in ctx.results["sections"].values()]
    if "failed" in statuses:
        return 1
    return 2 if "missing" in statuses else 0
