"""Plot every default-model candidate: clean synthetic accuracy against CUHK accuracy.

Usage:
    python benchmarks/tradeoff_plot.py [docs/default-model/tradeoff.json] [-o docs/default-model/tradeoff.png]

Reads the measured points (each from a full default build or an
inference-time re-weighting of one; the JSON says what each axis is) and
draws them with the two targets of the default model, so that the trade-off
between reading clean synthetic blur and real photos is visible at a glance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "default-model"
STYLE = {
    "mix": dict(marker="o", color="tab:blue", label="training mix (full default build)"),
    "shipped": dict(marker="*", color="tab:red", s=160, label="shipped default"),
    "tilt": dict(marker="^", color="tab:orange", label="shipped, classes re-weighted at inference"),
    "longer": dict(marker="D", color="tab:purple", label="shipped recipe, 2× the epochs"),
    "reference": dict(marker="s", color="black", label="authors' weights"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=DOCS / "tradeoff.json")
    parser.add_argument("-o", "--out", type=Path, default=DOCS / "tradeoff.png")
    args = parser.parse_args()
    data = json.loads(args.data.read_text())
    targets = data["targets"]

    # Points are numbered on the plot and named in a key beside it: their
    # labels would overlap where the candidates crowd together.
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 5), gridspec_kw={"width_ratios": [3, 1.3]})
    numbered = list(enumerate(data["points"], start=1))
    for kind, style in STYLE.items():
        points = [(i, p) for i, p in numbered if p["kind"] == kind]
        if not points:
            continue
        style = dict(style)
        ax.scatter([100 * p["clean_within_one"] for _, p in points], [p["cuhk_acc"] for _, p in points],
                   s=style.pop("s", 50), zorder=3, **style)
        for i, p in points:
            ax.annotate(str(i), (100 * p["clean_within_one"], p["cuhk_acc"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    key.axis("off")
    key.text(0, 1, "\n".join(f"{i:>2}  {p['label']}" for i, p in numbered), va="top", fontsize=8,
             family="monospace", transform=key.transAxes)
    x_target, y_target = 100 * targets["clean_within_one"], targets["cuhk_acc"]
    ax.axvline(x_target, color="grey", ls="--", lw=1)
    ax.axhline(y_target, color="grey", ls="--", lw=1)
    ax.fill_between([x_target, 100], y_target, 1, color="tab:green", alpha=0.12, label="both targets met")
    ax.set_xlim(80, 95)
    ax.set_ylim(0.66, 0.82)
    ax.set_xlabel("clean synthetic test: within one σ class (%)")
    ax.set_ylabel("CUHK dev (200 photos): accuracy, α = 0.3 rule")
    ax.set_title("Default-model candidates: synthetic against real-photo accuracy")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
