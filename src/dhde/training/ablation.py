"""The paper's feature study (Park et al. 2017, Table 1; ALGORITHM.md §6.6).

The same classifier is trained on each feature set — f_D, f_G, f_S, f_C
alone, f_H = [f_D, f_G, f_S], f_B = all four, [f_D, f_S, f_C],
[f_G, f_S, f_C] — and on f_B with single-scale patches (every patch 27×27,
from a dataset built with ``single_scale=True``). Each model is scored on the
test images of its dataset, exact class and within one class, and the
per-class confusion of every model is kept.

:func:`run_ablation` trains and writes ``results.json`` (rewritten after every
model, so an interrupted study keeps what it finished, and a rerun skips the
finished ones); :func:`write_report` turns that file into
``docs/feature-study.md`` and a confusion figure. The two are separate so that
the (long) training can run on any machine, a GPU one included, and the
report be written anywhere from its JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .dataset import _atomic_write_json

@dataclass(frozen=True)
class Variant:
    """One model of the study: key, label in the paper's notation, feature
    letters for :func:`~dhde.training.network.parse_features`, and whether
    its dataset is single-scale."""

    key: str
    label: str
    letters: str
    single_scale: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("D", "f_D", "D"),
    Variant("G", "f_G", "G"),
    Variant("S", "f_S", "S"),
    Variant("C", "f_C", "C"),
    Variant("H", "f_H = [f_D, f_G, f_S]", "DGS"),
    Variant("B", "f_B = [f_D, f_G, f_S, f_C]", "B"),
    Variant("DSC", "[f_D, f_S, f_C]", "DSC"),
    Variant("GSC", "[f_G, f_S, f_C]", "GSC"),
    Variant("B-single", "f_B, single-scale patches", "B", single_scale=True),
)

#: What the paper states (within-one-class test accuracy, %), ALGORITHM.md §6.6.
PAPER_STATEMENTS = {
    "C": "the strongest single feature",
    "B": "the best; 1–3 points above [f_D, f_S, f_C] and [f_G, f_S, f_C]",
    "DSC": "93.25 %",
    "GSC": "91.10 %",
    "B-single": "91.00 %",
}

RESULTS_FILE = "results.json"


def run_ablation(
    dataset_dir: Union[str, Path],
    out_dir: Union[str, Path],
    single_scale_dataset_dir: Optional[Union[str, Path]] = None,
    variants: Optional[Sequence[str]] = None,
    epochs: int = 8,
    pretrain_epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: str = "auto",
    num_threads: int = 2,
    log: Optional[Callable[[str], None]] = print,
) -> dict:
    """Train every variant and record its test scores and confusion.

    Args:
        dataset_dir: a two-scale dataset (:func:`~dhde.training.dataset.build_dataset`).
        out_dir: where models (``<key>.onnx``) and ``results.json`` go.
        single_scale_dataset_dir: the same images built with
            ``single_scale=True``; without it the single-scale variant is skipped.
        variants: keys of :data:`VARIANTS` to run, in this order (default
            all, in the order of :data:`VARIANTS`).
        epochs: epochs of the (final) stage of every variant, so single
            features and combinations see the same number of epochs.
        pretrain_epochs: epochs of stage 1 (f_C alone) of the combinations
            with f_C (the paper's two-stage schedule).
        seed, batch_size, lr: as :func:`~dhde.training.fit.fit`.
        device: "cpu", "cuda" or "auto".
        num_threads: torch CPU threads.
        log: called with progress lines; None = silent.

    Returns:
        The results dict (also in ``out_dir/results.json``): settings, and per
        variant the test accuracies, validation scores, epochs, seconds and
        the test confusion matrix (rows = true class).
    """
    from .dataset import load_split, read_manifest
    from .fit import confusion_matrix, fit, load_checkpoint, predict_labels, resolve_device, scores_from_labels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    by_key = {v.key: v for v in VARIANTS}
    unknown = set(variants or ()) - set(by_key)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(by_key)}")
    # In the order given, so the variants that matter most can run first.
    chosen = [by_key[key] for key in variants] if variants else list(VARIANTS)
    settings = {
        "dataset_dir": str(dataset_dir),
        "single_scale_dataset_dir": str(single_scale_dataset_dir) if single_scale_dataset_dir else None,
        "epochs": epochs,
        "pretrain_epochs": pretrain_epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "device": str(resolve_device(device)),
    }
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("settings", {}) != settings:
        results = {"settings": settings, "variants": {}}
    results["dataset_counts"] = read_manifest(dataset_dir)["counts"]

    for variant in chosen:
        if variant.key in results["variants"]:
            if log:
                log(f"{variant.key}: done earlier, skipped")
            continue
        data = single_scale_dataset_dir if variant.single_scale else dataset_dir
        if data is None:
            if log:
                log(f"{variant.key}: no single-scale dataset given, skipped")
            continue
        started = time.perf_counter()
        model_path = out_dir / f"{variant.key}.onnx"
        fitted = fit(
            data, model_path, features=variant.letters, epochs=epochs, pretrain_epochs=pretrain_epochs,
            seed=seed, batch_size=batch_size, lr=lr, num_threads=num_threads, device=device, log=log,
        )
        # The checkpoint holds the exported weights (the best epoch of the last stage).
        net = load_checkpoint(fitted.checkpoint_path).to(resolve_device(device))
        test = load_split(data, "test")
        predicted, _ = predict_labels(net, test)
        exact, within_one = scores_from_labels(test.label, predicted, test.sigma_labels)
        results["variants"][variant.key] = {
            **asdict(variant),
            "features": list(fitted.features),
            "test_exact": exact,
            "test_within_one": within_one,
            "test_samples": int(len(test)),
            "val": asdict(fitted.best_val) if fitted.best_val is not None else None,
            "history": [asdict(h) for h in fitted.history],
            "seconds": time.perf_counter() - started,
            "samples_per_second": fitted.training_samples_per_second,
            "confusion": confusion_matrix(test.label, predicted, len(test.sigma_labels)).tolist(),
            "sigma_labels": list(test.sigma_labels),
        }
        results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _atomic_write_json(results_path, results)
        if log:
            log(f"{variant.key}: test exact {exact:.4f}, within one class {within_one:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    return results


def confusion_figure(confusion: np.ndarray, sigma_labels: Sequence[float], path: Union[str, Path], title: str) -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true σ, columns: predicted σ)."""
    from ..evaluation.plots import pyplot, save_figure

    plt = pyplot()

    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ticks = [f"{s:.2f}" for s in sigma_labels]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    image = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(rates):
        if value >= 0.005:
            ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.5 else "white")
    ax.set_xticks(range(len(ticks)), ticks, rotation=90)
    ax.set_yticks(range(len(ticks)), ticks)
    ax.set_xlabel("predicted σ (px)")
    ax.set_ylabel("true σ (px)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    return save_figure(fig, path)


def results_table(runs: Sequence[dict]) -> str:
    """Markdown table: our test accuracies (one column per run, e.g. per seed,
    and their mean) next to the paper's statements."""
    seeds = [run["settings"]["seed"] for run in runs]
    seed_columns = " | ".join(f"seed {seed}" for seed in seeds)
    lines = [
        f"| features | within one class (±0.15 σ): {seed_columns} | mean | exact class, mean | paper |",
        "|---|" + "---|" * (len(runs) + 3),
    ]
    for variant in VARIANTS:
        entries = [run["variants"].get(variant.key) for run in runs]
        if all(entry is None for entry in entries):
            continue
        within = [entry["test_within_one"] if entry else None for entry in entries]
        exact = [entry["test_exact"] for entry in entries if entry]
        present = [w for w in within if w is not None]
        cells = " | ".join(f"{100 * w:.2f} %" if w is not None else "–" for w in within)
        lines.append(
            f"| {variant.label} | {cells} | {100 * np.mean(present):.2f} % | {100 * np.mean(exact):.2f} % | "
            f"{PAPER_STATEMENTS.get(variant.key, '')} |"
        )
    return "\n".join(lines)


def write_report(
    results_paths: Union[str, Path, Sequence[Union[str, Path]]],
    doc_path: Union[str, Path],
    figure_path: Union[str, Path],
    discussion: str = "",
    command: str = "",
) -> Path:
    """Write the feature-study page (markdown) and the f_B confusion figure.

    Args:
        results_paths: one or more ``results.json`` of :func:`run_ablation`
            (e.g. the same study with different seeds); the first one's
            settings are described and its f_B confusion is drawn.
        doc_path: the markdown file to write (e.g. ``docs/feature-study.md``).
        figure_path: the PNG of f_B's confusion matrix.
        discussion: markdown appended after the table (the interpretation).
        command: the command(s) that produced the results, shown verbatim.
    """
    if isinstance(results_paths, (str, Path)):
        results_paths = [results_paths]
    runs = [json.loads(Path(p).read_text()) for p in results_paths]
    results = runs[0]
    doc_path, figure_path = Path(doc_path), Path(figure_path)
    settings = results["settings"]
    if "B" in results["variants"]:
        entry = results["variants"]["B"]
        confusion_figure(np.array(entry["confusion"]), entry["sigma_labels"], figure_path,
                         f"f_B, test images, seed {settings['seed']}: "
                         f"{100 * entry['test_within_one']:.1f} % within one class")
    counts = results.get("dataset_counts", {})
    count_text = ", ".join(f"{name} {c['images']} images / {c['samples']} samples" for name, c in counts.items())
    relative_figure = os.path.relpath(figure_path, doc_path.parent)
    parts = [
        "# The paper's feature study, reproduced",
        "",
        "The same classifier (ALGORITHM.md §5) trained on each feature set and scored on the *test images* "
        "of the dataset (images never seen in training or validation), as within one class "
        "(|σ_pred − σ_true| ≤ 0.15, the paper's criterion) and exact class.",
        "",
        results_table(runs),
        "",
        f"Settings: {settings['epochs']} epochs per variant (combinations with f_C: {settings['pretrain_epochs']} "
        f"more epochs of f_C alone first, the paper's two-stage schedule), batch {settings['batch_size']}, "
        f"AdamW at {settings['lr']} with a cosine decay, on {settings['device']}. "
        f"Data: {count_text}.",
        "",
    ]
    if command:
        parts += ["Produced by:", "", "```", command.strip(), "```", ""]
    if "B" in results["variants"]:
        parts += [f"![confusion of f_B]({relative_figure})", ""]
    if discussion:
        parts += [discussion.strip(), ""]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(parts), encoding="utf-8")
    return doc_path


__all__ = ["PAPER_STATEMENTS", "VARIANTS", "Variant", "confusion_figure", "results_table", "run_ablation", "write_report"]
