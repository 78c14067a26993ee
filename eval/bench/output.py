"""The one output flag of every benchmark: `--out DIR` writes DIR/results.json (the numbers) and DIR/results.md
(the printed report), the file names the demos and `make gpu-check` use too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_out_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--out", type=Path, default=None, required=required,
                        help="folder for results.json and results.md")


def write_results(out: Path | None, result: dict, report: str) -> None:
    """Nothing where `out` is None (the report was printed)."""
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(report.rstrip("\n") + "\n")
