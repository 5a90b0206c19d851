"""The DHDE network as a trainable torch module (ALGORITHM.md §5).

The layers are the authors' (``DHDE_train.prototxt``): the deep feature f_C is
conv 3×3 (25) → ReLU → max-pool 3/3 → conv 3×3 (50) → ReLU → max-pool 3/3 →
conv 3×3 (50) → ReLU → conv 1×1 (25) → ReLU, and the classifier is
concat[f_D, f_G, f_S, f_C] → fc 300 (no bias) → ReLU → dropout → fc 150 →
ReLU → dropout → fc n_classes → ReLU. The final ReLU is part of the authors'
net (their ``SoftmaxWithLoss`` reads the ReLU'd fc3), so it is trained with it
here too: the exported model's probabilities are then those the loss saw.

Inputs are what the dhde model format feeds (``dhde.model``): hand-crafted
features as uint8 0..255 (N, 40) and colour patches as uint8 (N, 27, 27, 3)
in the natural [y, x, rgb] layout. The authors fed these values unscaled; this
module multiplies patches by ``patch_scale`` and features by ``feature_scale``
first, which keeps activations of order one and so suits Adam's default step
sizes. The scales are folded into conv1's and fc1's weights on export (both
layers are linear in their input), so the exported ONNX model takes 0..255
values as every dhde model does.

Caveat of the authors' design: with a ReLU before the softmax, a net whose
fc3 outputs all turn negative outputs a uniform distribution and gets no
gradient any more (the loss sticks at ln 11 ≈ 2.398). Too large a learning
rate does this early in training (seen with Adam at 4e-3); 1e-3 to 2e-3 is safe.

``features`` selects which of f_D, f_G, f_S, f_C the classifier sees, in the
fixed order ("dct", "grd", "svd", "deep") of fc1's input — the paper's
ablation. Only the features named are computed.

torch is imported here and only here (and in ``dhde.training.fit``): the
inference path never needs it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..model import DEEP_FEATURE, HAND_FEATURE_LENGTH, HAND_FEATURES, KNOWN_FEATURES, ModelMetadata, build_model, save_model

#: Width of the deep feature f_C (conv4's channels).
DEEP_WIDTH = 25
#: Default input scaling (see the module docstring). Patches: 0..255 → [0, 1].
#: Features: a log-normalised feature sums to 1 over 13 or 25 bins, so its
#: entries are ~10–20 after ×255; ×1/16 brings them near 1 (bias entries 16).
PATCH_SCALE = 1.0 / 255.0
FEATURE_SCALE = 1.0 / 16.0
#: Paper notation → dhde feature names. "B" (f_B) is all four.
FEATURE_LETTERS = {"D": ("dct",), "G": ("grd",), "S": ("svd",), "C": (DEEP_FEATURE,), "B": KNOWN_FEATURES}

FeatureSpec = Union[str, Iterable[str]]


def parse_features(spec: FeatureSpec) -> tuple[str, ...]:
    """Feature names, in fc1's canonical order, from a spec.

    ``spec`` is either paper letters (``"B"`` = f_B = all four; ``"DSC"`` =
    [f_D, f_S, f_C]; any of D, G, S, C) or an iterable of dhde names
    (``("dct", "deep")``). The result is ordered as ("dct", "grd", "svd",
    "deep"), whatever the order of ``spec``.

    Raises:
        ValueError: an unknown letter or name, or an empty spec.
    """
    if isinstance(spec, str):
        unknown = set(spec) - set(FEATURE_LETTERS)
        if unknown or not spec:
            raise ValueError(f"feature letters must be among {sorted(FEATURE_LETTERS)}, got {spec!r}")
        names = {name for letter in spec for name in FEATURE_LETTERS[letter]}
    else:
        names = set(spec)
        if not names or not names <= set(KNOWN_FEATURES):
            raise ValueError(f"features must be among {list(KNOWN_FEATURES)}, got {sorted(names)}")
    return tuple(name for name in KNOWN_FEATURES if name in names)


def _deep_tower() -> nn.Sequential:
    """f_C: (N, 3, 27, 27) → (N, 25). Caffe pooling rounds up (25 → 9, 7 → 3)."""
    return nn.Sequential(
        nn.Conv2d(3, 25, 3), nn.ReLU(), nn.MaxPool2d(3, 3, ceil_mode=True),
        nn.Conv2d(25, 50, 3), nn.ReLU(), nn.MaxPool2d(3, 3, ceil_mode=True),
        nn.Conv2d(50, 50, 3), nn.ReLU(),
        nn.Conv2d(50, DEEP_WIDTH, 1), nn.ReLU(),
        nn.Flatten(),
    )


class DHDENet(nn.Module):
    """The DHDE classifier over a chosen subset of features.

    Args:
        features: names among ("dct", "grd", "svd", "deep") or paper letters
            (see :func:`parse_features`).
        n_classes: number of σ labels (11).
        dropout: dropout probability after fc1 and fc2 (the authors' 0.5).
        patch_scale: factor applied to the 0..255 colour patches (default
            1/255; 1.0 = the authors' unscaled input).
        feature_scale: factor applied to the 0..255 hand-crafted features
            (default :data:`FEATURE_SCALE`; 1.0 = the authors' input).

    Call with a dict of uint8 or float tensors: ``"dct"``, ``"grd"``,
    ``"svd"`` (N, 40) and ``"patch"`` (N, 27, 27, 3), natural layout; entries
    for features not used are ignored. Returns the ReLU'd fc3 output
    (N, n_classes), the input of the softmax (and of the cross-entropy loss).
    """

    def __init__(self, features: FeatureSpec = "B", n_classes: int = 11, dropout: float = 0.5,
                 patch_scale: float = PATCH_SCALE, feature_scale: float = FEATURE_SCALE):
        super().__init__()
        self.features = parse_features(features)
        self.n_classes = int(n_classes)
        self.patch_scale = float(patch_scale)
        self.feature_scale = float(feature_scale)
        self.deep = _deep_tower() if DEEP_FEATURE in self.features else None
        width = sum(DEEP_WIDTH if f == DEEP_FEATURE else HAND_FEATURE_LENGTH for f in self.features)
        # fc1 has no bias: the hand-crafted features' constant entries play
        # that role (the authors froze fc1's bias at 0 with lr_mult 0).
        self.fc1 = nn.Linear(width, 300, bias=False)
        self.fc2 = nn.Linear(300, 150)
        self.fc3 = nn.Linear(150, self.n_classes)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation (``DHDE_train.prototxt``).

        Conv kernels: Caffe's Xavier filler, U(±√(3/fan_in)); conv biases 0.1.
        fc weights: N(0, 0.01²); fc2 and fc3 biases 0.1 (a positive bias keeps
        the final ReLU open at the start, so every class gets a gradient).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                bound = float(np.sqrt(3.0 / fan_in))
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.constant_(module.bias, 0.1)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.1)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.features:
            if name == DEEP_FEATURE:
                # (N, y, x, c) → (N, c, y, x): the natural layout of dhde models.
                patch = inputs["patch"].permute(0, 3, 1, 2).float() * self.patch_scale
                parts.append(self.deep(patch))
            else:
                parts.append(inputs[name].float() * self.feature_scale)
        x = torch.cat(parts, dim=1)
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return torch.relu(self.fc3(x))

    def hyperparameters(self) -> dict:
        """Constructor arguments that rebuild this net (weights aside)."""
        return {
            "features": self.features,
            "n_classes": self.n_classes,
            "dropout": self.dropout.p,
            "patch_scale": self.patch_scale,
            "feature_scale": self.feature_scale,
        }

    def fc1_columns(self) -> dict[str, slice]:
        """Columns of fc1's weight that read each feature."""
        columns, start = {}, 0
        for name in self.features:
            width = DEEP_WIDTH if name == DEEP_FEATURE else HAND_FEATURE_LENGTH
            columns[name] = slice(start, start + width)
            start += width
        return columns


def grow_features(trained: DHDENet, features: FeatureSpec) -> DHDENet:
    """A net over more features that computes exactly what ``trained`` does.

    Every layer of ``trained`` is copied; fc1's columns for the added features
    start at zero, so before fine-tuning the new net's output equals the old
    one's. This is the second stage of the authors' f_B schedule (train on f_C,
    then fine-tune with the hand-crafted features added).

    Raises:
        ValueError: ``features`` does not include every feature of ``trained``.
    """
    grown = DHDENet(**{**trained.hyperparameters(), "features": features})
    if not set(trained.features) <= set(grown.features):
        raise ValueError(f"cannot grow features {list(trained.features)} into {list(grown.features)}")
    with torch.no_grad():
        if trained.deep is not None:
            grown.deep.load_state_dict(trained.deep.state_dict())
        grown.fc1.weight.zero_()
        old_columns = trained.fc1_columns()
        for name, columns in grown.fc1_columns().items():
            if name in old_columns:
                grown.fc1.weight[:, columns] = trained.fc1.weight[:, old_columns[name]]
        grown.fc2.load_state_dict(trained.fc2.state_dict())
        grown.fc3.load_state_dict(trained.fc3.state_dict())
    return grown


def export_weights(net: DHDENet) -> dict[str, np.ndarray]:
    """The net's weights in dhde's weight-dict convention, for 0..255 inputs.

    ``patch_scale`` is folded into conv1's kernel and ``feature_scale`` into
    fc1's hand-crafted columns (exact: both layers are linear in the scaled inputs), so the
    returned weights expect the unscaled uint8 values of the model format.
    fc1 gets an all-zero bias (the format's fc layers all carry one).
    """
    state = {key: value.detach().cpu().double().numpy() for key, value in net.state_dict().items()}
    weights: dict[str, np.ndarray] = {}
    if net.deep is not None:
        conv_indices = [i for i, m in enumerate(net.deep) if isinstance(m, nn.Conv2d)]
        for k, index in enumerate(conv_indices, start=1):
            weights[f"conv{k}.weight"] = state[f"deep.{index}.weight"]
            weights[f"conv{k}.bias"] = state[f"deep.{index}.bias"]
        weights["conv1.weight"] = weights["conv1.weight"] * net.patch_scale
    fc1 = state["fc1.weight"].copy()
    for name, columns in net.fc1_columns().items():
        if name in HAND_FEATURES:
            fc1[:, columns] *= net.feature_scale
    weights["fc1.weight"] = fc1
    weights["fc1.bias"] = np.zeros(fc1.shape[0])
    for layer in ("fc2", "fc3"):
        weights[f"{layer}.weight"] = state[f"{layer}.weight"]
        weights[f"{layer}.bias"] = state[f"{layer}.bias"]
    return {key: value.astype(np.float32) for key, value in weights.items()}


def export_model(
    net: DHDENet,
    out_path: Union[str, Path],
    sigma_labels: Sequence[float],
    source: str = "trained with dhde.training",
    description: str = "",
    training: Optional[Mapping[str, object]] = None,
) -> Path:
    """Write ``net`` as a dhde model file (ONNX built by :func:`dhde.model.build_model`).

    Args:
        net: a trained :class:`DHDENet`.
        out_path: the ``.onnx`` file to write.
        sigma_labels: σ (pixels) of each class, in output order.
        source, description: the model's metadata fields.
        training: provenance (data, split, seed, epochs, accuracies, ...),
            stored as JSON under the extra metadata key ``dhde.training``
            (``ModelMetadata`` has no field for it; readers ignore extra keys).

    Returns:
        ``out_path`` as a Path.
    """
    metadata = ModelMetadata(
        features=net.features,
        sigma_labels=tuple(float(s) for s in sigma_labels),
        patch_layout="natural",
        source=source,
        created=datetime.date.today().isoformat(),
        dhde_version=__version__,
        description=description,
    )
    model = build_model(export_weights(net), metadata)
    if training is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "dhde.training", json.dumps(dict(training), sort_keys=True)
    return save_model(model, out_path)


__all__ = ["DHDENet", "FEATURE_LETTERS", "export_model", "export_weights", "grow_features", "parse_features"]
