"""Figures of an evaluation run (matplotlib, Agg backend, PNG files).

* ``pr_curves.png``: precision–recall curves of all methods on one chart,
  thresholds k/255 on each min-max normalised map, precision and recall
  averaged over images at each threshold (the curve whose best F is
  ``max_f``);
* ``pr_sigma.png``: the same with the threshold swept over σ itself (the
  paper's Figure 7), for methods whose maps are in σ;
* ``grid.png``: input / ground truth (mask, and σ when known) / each
  method's map for a few images, maps min-max normalised per image as they
  are scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..io import load_image
from .datasets import Dataset, load_mask, load_sigma
from .metrics import normalise_map


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: slow)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Write a matplotlib figure to ``path`` (parents created), close it, return the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_pr_curves(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """One chart of precision (y) against recall (x) per ``(label, recall, precision)``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    for label, recall, precision in curves:
        ax.plot(recall, precision, label=label, linewidth=1.6)
    ax.set(xlabel="recall (blurred = positive)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def plot_map_grid(
    rows: Sequence[dict],
    column_labels: Sequence[str],
    path: Path,
) -> Path:
    """A grid of images: one row per dict of ``{"stem", "panels"}``.

    ``panels`` is a list aligned with ``column_labels`` of (H, W, 3) RGB in
    [0, 1], (H, W) maps in [0, 1] (NaN drawn black), or None (empty cell).
    """
    plt = pyplot()
    columns = len(column_labels)
    # Cells shaped like the photos (median aspect), so the figure has no
    # empty bands between rows.
    aspect = float(np.median([row["panels"][0].shape[0] / row["panels"][0].shape[1] for row in rows]))
    cell = 2.2
    fig, axes = plt.subplots(len(rows), columns, figsize=(cell * columns, (cell * aspect + 0.25) * len(rows)),
                             dpi=110, squeeze=False)
    cmap = plt.get_cmap("magma").with_extremes(bad="black")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row["panels"]):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is not None:
                if panel.ndim == 3:
                    ax.imshow(panel)
                else:
                    ax.imshow(np.ma.masked_invalid(panel), cmap=cmap, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(column_labels[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row["stem"], fontsize=6)
    return save_figure(fig, path)


def _normalised_display(values: np.ndarray) -> np.ndarray:
    """Min-max normalise the finite pixels; NaN stays NaN."""
    shown = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        shown[finite] = normalise_map(values[finite])
    return shown


def plot_run(dataset: Dataset, methods, result, out_dir: Path, grid_stems: Optional[Sequence[str]] = None) -> list[Path]:
    """Draw the run's figures under ``out_dir/plots`` from its summaries and cached maps."""
    from .runner import map_path, read_map

    out_dir = Path(out_dir)
    written = []
    scored = [m for m in methods if m.key in result.summaries]
    curves = [
        (f"{m.label}: AP {result.summaries[m.key].values['ap_pooled']:.3f}, "
         f"max F {result.summaries[m.key].values['max_f']:.3f}",
         np.asarray(result.summaries[m.key].pr_curve["recall"]),
         np.asarray(result.summaries[m.key].pr_curve["precision"]))
        for m in scored
    ]
    written.append(plot_pr_curves(curves, out_dir / "plots" / "pr_curves.png",
                                  f"{dataset.root.name}: thresholds on the normalised map"))
    sigma = [m for m in scored if result.summaries[m.key].sigma_pr_curve is not None]
    if sigma:
        sigma_curves = [
            (f"{m.label}: max F {result.summaries[m.key].values['max_f_sigma']:.3f}",
             np.asarray(result.summaries[m.key].sigma_pr_curve["recall"]),
             np.asarray(result.summaries[m.key].sigma_pr_curve["precision"]))
            for m in sigma
        ]
        written.append(plot_pr_curves(sigma_curves, out_dir / "plots" / "pr_sigma.png",
                                      f"{dataset.root.name}: threshold swept over sigma"))

    by_stem = {s.stem: s for s in dataset.samples}
    if grid_stems is None:
        common = [s.stem for s in dataset.samples if all(map_path(out_dir, m, s.stem).exists() for m in scored)]
        picks = np.linspace(0, len(common) - 1, min(4, len(common))).round().astype(int) if common else []
        grid_stems = [common[i] for i in picks]
    labels = ["input", "ground truth"] + (["true sigma"] if dataset.has_sigma else []) + [m.label for m in scored]
    rows = []
    for stem in grid_stems:
        sample = by_stem.get(stem)
        if sample is None:
            continue
        try:
            panels = [load_image(sample.image_path), load_mask(sample.mask_path).astype(np.float64)]
            if dataset.has_sigma:
                panels.append(_normalised_display(load_sigma(sample.sigma_path)))
        except Exception:  # a bad image has no row; the run already reported it
            continue
        for method in scored:
            path = map_path(out_dir, method, stem)
            panels.append(_normalised_display(read_map(path)) if path.exists() else None)
        rows.append({"stem": stem, "panels": panels})
    if rows:
        written.append(plot_map_grid(rows, labels, out_dir / "plots" / "grid.png"))
    return written
