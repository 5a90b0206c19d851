"""Markdown results tables from `dhde evaluate` output folders, optionally into README.md.

Usage:
    python benchmarks/results_table.py OUT_DIR [OUT_DIR ...]                  # print
    python benchmarks/results_table.py OUT_DIR [OUT_DIR ...] --readme README.md

Each OUT_DIR is the --out folder of one `dhde evaluate` run; its
summary.json gives one table (a row per method, the command that produced
it underneath). With --readme, the text between the marker lines

    <!-- evaluation-results:begin -->
    <!-- evaluation-results:end -->

is replaced by the tables; nothing else in the file changes. Metrics are
defined in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN = "<!-- evaluation-results:begin -->"
END = "<!-- evaluation-results:end -->"

#: (summary key, column title); σ columns appear only when some method has them.
MASK_COLUMNS = (
    ("acc", "acc (α = 0.3)"),
    ("mean_best_f", "mean best F"),
    ("max_f", "max F"),
    ("f_tau", "F at τ"),
    ("f_adaptive", "F adaptive"),
    ("mae", "MAE"),
    ("ap_pooled", "AP pooled"),
    ("ap_per_image", "AP per image"),
)
SIGMA_COLUMNS = (
    ("max_f_sigma", "max F (σ sweep)"),
    ("sigma_mae", "MAE σ (px)"),
    ("sigma_rmse", "RMSE σ (px)"),
    ("sigma_within", "within 0.15 px"),
    ("sigma_mae_in_range", "MAE σ, true σ in 0.5–2"),
)


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def table(summary: dict, title: str, seconds: bool = False) -> str:
    """One markdown table (with title line and command) from a summary.json dict.

    ``seconds`` adds the median compute seconds per image (meaningful only
    when the run had the machine to itself).
    """
    methods = [m for m in summary["methods"] if m.get("metrics")]
    sigma = [(k, t) for k, t in SIGMA_COLUMNS if any(k in m["metrics"] for m in methods)]
    if summary["dataset"]["has_sigma"]:
        # On a known-σ benchmark the σ columns matter most; keep the mask
        # columns that do not depend on a threshold choice.
        columns = [c for c in MASK_COLUMNS if c[0] in ("acc", "max_f", "mae", "ap_pooled")] + sigma
    else:
        columns = list(MASK_COLUMNS) + [c for c in sigma if c[0] == "max_f_sigma"]
    images = max((m["images"] for m in methods), default=0)
    lines = [
        f"**{title}** ({images} images)",
        "",
        "| method | " + " | ".join(t for _, t in columns) + (" | s / image |" if seconds else " |"),
        "|---|" + "---|" * (len(columns) + seconds),
    ]
    for method in methods:
        cells = [_cell(method["metrics"].get(key)) for key, _ in columns]
        if seconds:
            median = method.get("median_seconds")
            cells.append("–" if median is None else f"{median:.2f}")
        lines.append(f"| {method['label']} | " + " | ".join(cells) + " |")
    failures = summary.get("failures", [])
    lines.append("")
    if summary.get("command"):
        lines.append(f"Produced by `{summary['command']}` (dhde {summary['dhde_version']}, {summary['date']}).")
    if failures:
        lines.append(f"{len(failures)} failure(s) are listed in that run's summary.json.")
    return "\n".join(lines)


def replace_between_markers(text: str, body: str) -> str:
    """Replace the text between the BEGIN and END marker lines (markers kept)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {BEGIN} … {END} not found (in this order)")
    return text[: start + len(BEGIN)] + "\n" + body.rstrip() + "\n" + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`dhde evaluate` output folders")
    parser.add_argument("--title", action="append", default=[],
                        help="table title per run, in order (default: the dataset folder's name)")
    parser.add_argument("--readme", type=Path, help="rewrite this file between the marker lines")
    parser.add_argument("--seconds", action="store_true", help="add the median seconds per image")
    args = parser.parse_args()

    tables = []
    for index, run in enumerate(args.runs):
        summary = json.loads((run / "summary.json").read_text())
        title = args.title[index] if index < len(args.title) else Path(summary["dataset"]["root"]).name
        tables.append(table(summary, title, args.seconds))
    body = "\n\n".join(tables)
    if args.readme is None:
        print(body)
        return
    try:
        updated = replace_between_markers(args.readme.read_text(), body)
    except ValueError as exc:
        sys.exit(f"{args.readme}: {exc}")
    args.readme.write_text(updated)
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
