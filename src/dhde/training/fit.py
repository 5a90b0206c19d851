"""Training loop: fit the DHDE network on a dataset from :mod:`dhde.training.dataset`.

Schedule (ALGORITHM.md §6.5): for a model that uses the deep feature *and*
hand-crafted features (f_B), stage 1 trains the conv tower and classifier on
f_C alone; stage 2 adds the hand-crafted features (their fc1 columns start at
zero, so stage 2 starts from stage 1's function, see
:func:`~dhde.training.network.grow_features`) and fine-tunes everything. Other
feature sets train in one stage. The authors used SGD with momentum; Adam(W)
is used here (allowed by §6.5), a constant learning rate per stage.

Each stage keeps the weights of its best epoch on the validation split (exact
accuracy); the final model is exported to dhde's model format with its
provenance and test accuracies (exact class, and within one class, i.e.
|σ_pred − σ_true| ≤ 0.15 — the paper's criterion).
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..model import DEEP_FEATURE, HAND_FEATURES
from .dataset import SampleSet, load_split, read_manifest
from .network import FEATURE_SCALE, PATCH_SCALE, DHDENet, FeatureSpec, export_model, grow_features, parse_features

#: Slack on the "within one class" test for float σ values.
_SIGMA_EPS = 1e-9


@dataclass
class EpochLog:
    """One epoch of one stage. Accuracies are fractions in [0, 1]."""

    stage: str
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_within_one: float
    #: wall time of the epoch: training steps, then validation.
    seconds: float
    #: training samples and the seconds of the training steps alone.
    train_samples: int
    train_seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"[{self.stage}] epoch {self.epoch:3d}  loss {self.train_loss:.4f}  acc {self.train_accuracy:.4f}  "
            f"val loss {self.val_loss:.4f}  val acc {self.val_accuracy:.4f}  val ±1 {self.val_within_one:.4f}  "
            f"({self.seconds:.1f} s, {self.samples_per_second:.0f} samples/s)"
        )


@dataclass
class Evaluation:
    """Scores of a net on one split."""

    samples: int
    loss: float
    accuracy: float
    within_one: float


@dataclass
class FitResult:
    """What :func:`fit` did: the exported model, the log, the scores."""

    model_path: Path
    checkpoint_path: Path
    features: tuple[str, ...]
    history: list[EpochLog] = field(default_factory=list)
    best_val: Optional[Evaluation] = None
    test: Optional[Evaluation] = None
    training_seconds: float = 0.0
    training_samples_per_second: float = 0.0


def sigma_tolerance(sigma_labels) -> float:
    """One label step (0.15 for the default labels) plus float slack."""
    sigmas = np.asarray(sigma_labels, dtype=np.float64)
    return float(np.min(np.diff(np.sort(sigmas)))) + _SIGMA_EPS


def _tensors(samples: SampleSet, features: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 tensors of the inputs ``features`` need, on ``device``.

    On the CPU they share memory with the numpy arrays; on a GPU the whole
    split is copied once (uint8 keeps it small: ~2.2 kB per sample), so
    batches are gathered on the device with no host transfers per step.
    """
    inputs = {name: torch.from_numpy(getattr(samples, name)) for name in HAND_FEATURES if name in features}
    if DEEP_FEATURE in features:
        inputs["patch"] = torch.from_numpy(samples.patch)
    return {name: values.to(device) for name, values in inputs.items()}


def _batch(inputs: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: values[index] for name, values in inputs.items()}


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``/None → CUDA when available, else the CPU; otherwise as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def predict_labels(net: DHDENet, samples: SampleSet, batch_size: int = 1024) -> tuple[np.ndarray, float]:
    """Predicted label per sample (int64 (N,)) and the summed cross-entropy.

    Runs on the device the net's weights are on, in eval mode (no dropout).
    """
    device = _device_of(net)
    net.eval()
    inputs = _tensors(samples, net.features, device)
    labels = torch.from_numpy(samples.label.astype(np.int64)).to(device)
    predicted = torch.empty(len(samples), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(samples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(samples)), device=device)
        scores = net(_batch(inputs, index))
        loss_sum += nn.functional.cross_entropy(scores, labels[index], reduction="sum").double()
        predicted[index] = scores.argmax(dim=1)
    return predicted.cpu().numpy(), float(loss_sum)


def ordinal_targets(n_classes: int, label_sigma: float) -> Optional[torch.Tensor]:
    """Soft training targets that respect the order of the σ classes, or None.

    Row y is a Gaussian over class indices centred on y with standard
    deviation ``label_sigma`` (in classes), normalised to sum to 1; None
    for ``label_sigma`` = 0 (one-hot targets, plain cross-entropy). The
    paper scores a prediction within one class of the truth as correct, and
    neighbouring classes differ by 0.15 px of blur, so confusing them should
    cost less than confusing distant ones; one-hot cross-entropy charges
    every wrong class alike.

    Returns:
        float32 (n_classes, n_classes) tensor on the CPU, or None.
    """
    if label_sigma < 0:
        raise ValueError(f"label_sigma must be >= 0, got {label_sigma}")
    if label_sigma == 0:
        return None
    index = torch.arange(n_classes, dtype=torch.float64)
    weights = torch.exp(-0.5 * ((index[None, :] - index[:, None]) / label_sigma) ** 2)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def confusion_matrix(true_labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 (n_classes, n_classes): row = true label, column = predicted."""
    counts = np.bincount(true_labels.astype(np.int64) * n_classes + predicted, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def scores_from_labels(true_labels: np.ndarray, predicted: np.ndarray, sigma_labels) -> tuple[float, float]:
    """(exact accuracy, within-one-class accuracy) of predicted labels."""
    sigmas = np.asarray(sigma_labels, dtype=np.float64)
    exact = float(np.mean(predicted == true_labels))
    near = float(np.mean(np.abs(sigmas[predicted] - sigmas[true_labels.astype(np.int64)]) <= sigma_tolerance(sigmas)))
    return exact, near


def evaluate(net: DHDENet, samples: SampleSet, batch_size: int = 1024) -> Evaluation:
    """Mean cross-entropy, exact accuracy and within-one-class accuracy on ``samples``."""
    if len(samples) == 0:
        return Evaluation(0, float("nan"), float("nan"), float("nan"))
    predicted, loss_sum = predict_labels(net, samples, batch_size)
    exact, near = scores_from_labels(samples.label, predicted, samples.sigma_labels)
    return Evaluation(len(samples), loss_sum / len(samples), exact, near)


def _save_checkpoint(path: Path, net: DHDENet, info: dict) -> None:
    """torch.save of the state dict and how to rebuild the net, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": net.state_dict(),
        "hyperparameters": {**net.hyperparameters(), "features": list(net.features)},
        **info,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Union[str, Path]) -> DHDENet:
    """Rebuild a :class:`DHDENet` from a checkpoint written by :func:`fit`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = DHDENet(**payload["hyperparameters"])
    net.load_state_dict(payload["state_dict"])
    return net


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got {name!r}")


#: Final learning rate of the cosine schedule, as a fraction of the initial one.
COSINE_FLOOR = 0.02

SCHEDULES = ("cosine", "constant")


def _make_scheduler(name: str, opt: torch.optim.Optimizer, total_steps: int):
    if name == "constant":
        return None
    if name == "cosine":
        # A stage ends at a low learning rate, so its last epochs average out
        # the step noise that made validation accuracy swing between epochs
        # under a constant rate (±1.5 points, session-1 logs).
        base = opt.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=base * COSINE_FLOOR)
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose from {SCHEDULES}")


def train_stage(
    net: DHDENet,
    train: SampleSet,
    val: SampleSet,
    stage: str,
    epochs: int,
    generator: torch.Generator,
    batch_size: int,
    lr: float,
    weight_decay: float,
    optimizer: str,
    checkpoint_path: Path,
    log: Optional[Callable[[str], None]],
    progress: bool = False,
    schedule: str = "cosine",
    soft_targets: Optional[torch.Tensor] = None,
) -> tuple[DHDENet, list[EpochLog], Optional[Evaluation]]:
    """Train ``net`` for ``epochs``; return the best-on-validation weights.

    ``schedule`` is "constant" (``lr`` throughout) or "cosine" (``lr``
    decayed per step along a half cosine to ``lr * COSINE_FLOOR`` at the end
    of the stage). Without validation samples the last epoch's weights are
    returned. The best weights so far are also checkpointed to
    ``checkpoint_path``. ``soft_targets`` (see :func:`ordinal_targets`)
    replaces the one-hot targets of the training loss.
    """
    device = _device_of(net)
    inputs = _tensors(train, net.features, device)
    labels = torch.from_numpy(train.label.astype(np.int64)).to(device)
    if soft_targets is not None:
        soft_targets = soft_targets.to(device)
    opt = _make_optimizer(optimizer, net.parameters(), lr, weight_decay)
    scheduler = _make_scheduler(schedule, opt, epochs * ((len(train) + batch_size - 1) // batch_size))
    history: list[EpochLog] = []
    best_state, best_eval = None, None
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        # Summed on the device: a float() per step would synchronise a GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bar = tqdm(total=len(train), desc=f"{stage} epoch {epoch}", unit="sample", disable=not progress, leave=False)
        for first in range(0, len(train), batch_size):
            index = order[first:first + batch_size]
            target = labels[index]
            scores = net(_batch(inputs, index))
            loss = nn.functional.cross_entropy(scores, target if soft_targets is None else soft_targets[target])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach().double() * len(index)
            correct += (scores.argmax(dim=1) == target).sum()
            bar.update(len(index))
        bar.close()
        train_seconds = time.perf_counter() - start
        val_eval = evaluate(net, val)
        entry = EpochLog(
            stage, epoch, float(loss_sum) / len(train), int(correct) / len(train), val_eval.loss, val_eval.accuracy,
            val_eval.within_one, time.perf_counter() - start, len(train), train_seconds,
        )
        history.append(entry)
        if log is not None:
            log(entry.line())
        improved = best_eval is None or (val_eval.samples > 0 and val_eval.accuracy > best_eval.accuracy)
        if val_eval.samples == 0 or improved:
            best_state, best_eval = copy.deepcopy(net.state_dict()), val_eval
            _save_checkpoint(checkpoint_path, net, {"stage": stage, "epoch": epoch, "val": asdict(val_eval)})
    if best_state is not None:
        net.load_state_dict(best_state)
    return net, history, (best_eval if best_eval is not None and best_eval.samples > 0 else None)


def fit(
    dataset_dir: Union[str, Path],
    out_path: Union[str, Path],
    features: FeatureSpec = "B",
    epochs: int = 10,
    pretrain_epochs: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    finetune_lr: Optional[float] = None,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    schedule: str = "cosine",
    dropout: float = 0.5,
    label_sigma: float = 0.0,
    patch_scale: float = PATCH_SCALE,
    feature_scale: float = FEATURE_SCALE,
    num_threads: int = 2,
    device: Union[str, torch.device, None] = "cpu",
    checkpoint_path: Optional[Union[str, Path]] = None,
    log: Optional[Callable[[str], None]] = print,
    progress: bool = False,
) -> FitResult:
    """Train a DHDE model on a dataset and export it as a dhde model file.

    Args:
        dataset_dir: a folder written by :func:`dhde.training.dataset.build_dataset`.
        out_path: the ``.onnx`` model to write.
        features: feature set, paper letters or dhde names (see
            :func:`~dhde.training.network.parse_features`); "B" = f_B.
        epochs: epochs of the final stage (all features).
        pretrain_epochs: epochs of stage 1 (f_C alone) when ``features``
            combines f_C with hand-crafted features; default ``epochs``; 0
            skips stage 1. Ignored for other feature sets.
        seed: seeds weight initialisation, dropout and shuffling.
        batch_size: samples per step (the authors' 128).
        lr: learning rate of stage 1 (or of the only stage).
        finetune_lr: learning rate of stage 2 (default ``lr``).
        weight_decay: decoupled (AdamW) or L2 (Adam) weight decay.
        optimizer: "adamw" or "adam".
        schedule: learning rate within each stage, "cosine" (decays to
            ``COSINE_FLOOR`` × the stage's rate) or "constant".
        dropout: dropout after fc1 and fc2.
        label_sigma: 0 trains on one-hot labels (plain cross-entropy); > 0 on
            ordinal soft labels, a Gaussian of this width in classes over the
            neighbouring σ classes (see :func:`ordinal_targets`).
        patch_scale, feature_scale: input scaling inside the net (see
            :class:`~dhde.training.network.DHDENet`; folded into the
            exported weights).
        num_threads: torch intra-op threads during the fit (restored after).
        device: where to train: "cpu" (the default, what the shipped model
            used), "cuda", or "auto" (CUDA when available). The exported
            model runs on the CPU with onnxruntime either way.
        checkpoint_path: where the best weights so far are saved
            (``torch.save``); default ``out_path`` with suffix ``.pt``.
        log: called with one line per epoch; None = silent.
        progress: show a tqdm bar over each epoch's samples.

    Returns:
        A :class:`FitResult` with the history, the best validation scores and
        the test scores of the exported weights.
    """
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else out_path.with_suffix(".pt")
    feature_names = parse_features(features)
    manifest = read_manifest(dataset_dir)
    train, val, test = (load_split(dataset_dir, name) for name in ("train", "val", "test"))
    if len(train) == 0:
        raise ValueError(f"{dataset_dir}: the train split has no samples")
    n_classes = len(manifest["sigma_labels"])
    soft_targets = ordinal_targets(n_classes, label_sigma)

    device = resolve_device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        two_stage = DEEP_FEATURE in feature_names and len(feature_names) > 1
        pretrain_epochs = epochs if pretrain_epochs is None else pretrain_epochs
        stages = []
        if two_stage and pretrain_epochs > 0:
            stages.append(((DEEP_FEATURE,), "f_C", pretrain_epochs, lr))
        stages.append((feature_names, "final", epochs, lr if not stages else (finetune_lr or lr)))

        history: list[EpochLog] = []
        net: Optional[DHDENet] = None
        best_val: Optional[Evaluation] = None
        started = time.perf_counter()
        for stage_features, stage_name, stage_epochs, stage_lr in stages:
            if net is None:
                net = DHDENet(stage_features, n_classes, dropout, patch_scale, feature_scale).to(device)
            else:
                net = grow_features(net.cpu(), stage_features).to(device)
            net, stage_history, best_val = train_stage(
                net, train, val, stage_name, stage_epochs, generator, batch_size, stage_lr, weight_decay,
                optimizer, checkpoint_path, log, progress, schedule, soft_targets,
            )
            history += stage_history
        training_seconds = time.perf_counter() - started
        test_eval = evaluate(net, test)
    finally:
        torch.set_num_threads(previous_threads)

    train_seconds = sum(h.train_seconds for h in history)
    result = FitResult(
        model_path=out_path,
        checkpoint_path=checkpoint_path,
        features=feature_names,
        history=history,
        best_val=best_val,
        test=test_eval,
        training_seconds=training_seconds,
        training_samples_per_second=sum(h.train_samples for h in history) / train_seconds if train_seconds > 0 else 0.0,
    )
    provenance = {
        "dataset_dir": str(dataset_dir),
        "sharp_dir": manifest.get("sharp_dir"),
        "dataset_seed": manifest["seed"],
        "max_positions_per_image": manifest["max_positions_per_image"],
        "split_fractions": manifest["split_fractions"],
        "split_counts": manifest["counts"],
        "seed": seed,
        "features": list(feature_names),
        "schedule": [{"stage": name, "features": list(f), "epochs": e, "lr": r} for f, name, e, r in stages],
        "optimizer": optimizer,
        "lr_schedule": schedule,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "dropout": dropout,
        "label_sigma": label_sigma,
        "patch_scale": patch_scale,
        "feature_scale": feature_scale,
        "val": asdict(best_val) if best_val is not None else None,
        "test": asdict(test_eval),
        "history": [asdict(h) for h in history],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dhde_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
    }
    description = (
        f"DHDE network over features {list(feature_names)}, trained with dhde.training.fit "
        f"(seed {seed}, {len(history)} epochs, {len(train)} training samples). "
        f"Test: {test_eval.accuracy:.4f} exact, {test_eval.within_one:.4f} within one class "
        f"({test_eval.samples} samples)."
    )
    export_model(
        net, out_path, manifest["sigma_labels"],
        source=f"trained with dhde.training on {manifest.get('sharp_dir')}",
        description=description, training=provenance,
    )
    return result


__all__ = ["EpochLog", "Evaluation", "FitResult", "evaluate", "fit", "load_checkpoint", "sigma_tolerance", "train_stage"]
