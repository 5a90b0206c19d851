"""dhde's model format and its onnxruntime runner (ALGORITHM.md §5).

A dhde model is one ONNX file. Its graph is the DHDE network: inputs

- ``dct``, ``grd``, ``svd``: (N, 40) float32, the scale-encoded hand-crafted
  features f_D, f_G, f_S, quantised to 0..255 (see ``input_quantisation``);
- ``patch``: (N, 3, 27, 27) float32, RGB colour patches with values 0..255,

(a model holds only the inputs of the features it uses), and outputs

- ``prob``: (N, n_classes) float32 softmax probabilities of the σ labels;
- ``logits_relu``: (N, n_classes) float32, the ReLU'd fc output fed to the
  softmax.

The network (the authors' architecture): deep feature f_C = conv 3×3 → ReLU →
max-pool 3/3 → conv 3×3 → ReLU → max-pool 3/3 → conv 3×3 → ReLU → conv 1×1 →
ReLU; classifier = concat of the used features in the order ``features``
lists them → (fc → ReLU) repeated, the last fc's ReLU included (the authors'
net has fc3 → ReLU → softmax) → softmax. Caffe max pooling rounds the output
size *up* (25 → 9, 7 → 3; the last window is partial); ONNX ``MaxPool`` with
``ceil_mode=1`` computes exactly that. Dropout is the identity at inference
and is not in the graph.

The file's ``metadata_props`` (keys ``dhde.*``, values strings) say how to
feed it; see :class:`ModelMetadata`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .config import DHDEConfig, default_sigma_labels
from .errors import ModelError

#: Value of ``dhde.format``: marks an ONNX file as a dhde model.
FORMAT_NAME = "dhde-defocus-model"
#: Version of the format this module writes and reads.
FORMAT_VERSION = 1
#: ONNX opset and IR version of the graphs written (IR 8 keeps the files
#: loadable by onnxruntime ≥ 1.14).
OPSET = 17
IR_VERSION = 8

#: Hand-crafted feature inputs and their length (scale-encoded, with bias entries).
HAND_FEATURE_LENGTH = 40
HAND_FEATURES = ("dct", "grd", "svd")
#: Name of the deep feature f_C, computed inside the graph from ``patch``.
DEEP_FEATURE = "deep"
KNOWN_FEATURES = (*HAND_FEATURES, DEEP_FEATURE)
#: Colour patches fed to the network are PATCH_SIZE × PATCH_SIZE × 3.
PATCH_SIZE = 27
PATCH_INPUT = "patch"

PatchLayout = Literal["natural", "transposed"]
#: How a row-major patch P[n, y, x, c] becomes the (N, 3, 27, 27) input:
#: "natural" = [n, c, y, x]; "transposed" = [n, c, x, y] (the authors' Caffe
#: blobs). Values: axes for ``np.transpose`` of an (N, y, x, c) array.
_PATCH_AXES: dict[str, tuple[int, int, int, int]] = {
    "natural": (0, 3, 1, 2),
    "transposed": (0, 3, 2, 1),
}

# Conv tower of the deep feature: (layer, max-pool after it).
_CONV_LAYERS = (("conv1", True), ("conv2", True), ("conv3", False), ("conv4", False))
_POOL_SIZE = 3

_META_PREFIX = "dhde."


@dataclass(frozen=True)
class ModelMetadata:
    """What a dhde model file says about itself (its ``metadata_props``).

    Attributes:
        features: the features the classifier sees, in the order they are
            concatenated into fc1: a subset of ("dct", "grd", "svd", "deep").
        sigma_labels: σ (pixels) of each output class, in output order.
        patch_layout: "natural" ([n, c, y, x]) or "transposed" ([n, c, x, y])
            arrangement of the ``patch`` input.
        input_quantisation: "uint8": every feature entry f in [0, 1] enters as
            the float32 value of uint8(255·f), rounded half away from zero and
            saturated (MATLAB's ``uint8``); pixels as their uint8 values.
        source: where the weights come from.
        created: ISO date the file was written.
        dhde_version: dhde version that wrote the file.
        description: free text.
        format_version: version of this format (:data:`FORMAT_VERSION`).
    """

    features: tuple[str, ...] = KNOWN_FEATURES
    sigma_labels: tuple[float, ...] = field(default_factory=default_sigma_labels)
    patch_layout: PatchLayout = "natural"
    input_quantisation: Literal["uint8"] = "uint8"
    source: str = ""
    created: str = ""
    dhde_version: str = __version__
    description: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        features = tuple(self.features)
        if not features or len(set(features)) != len(features) or not set(features) <= set(KNOWN_FEATURES):
            raise ModelError(f"model features must be distinct names among {list(KNOWN_FEATURES)}, got {list(features)}")
        if self.patch_layout not in _PATCH_AXES:
            raise ModelError(f"unknown patch layout {self.patch_layout!r} (expected one of {list(_PATCH_AXES)})")
        if self.input_quantisation != "uint8":
            raise ModelError(f"unknown input quantisation {self.input_quantisation!r} (expected 'uint8')")
        if len(self.sigma_labels) < 2:
            raise ModelError(f"a model needs at least 2 σ labels, got {len(self.sigma_labels)}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "sigma_labels", tuple(float(s) for s in self.sigma_labels))

    def to_props(self) -> dict[str, str]:
        """The metadata as ONNX ``metadata_props`` (string keys and values)."""
        props = {"format": FORMAT_NAME}
        for key, value in asdict(self).items():
            props[key] = json.dumps(list(value)) if isinstance(value, tuple) else str(value)
        return {_META_PREFIX + key: value for key, value in props.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], where: str = "model") -> "ModelMetadata":
        """Parse ``metadata_props``; raises ModelError naming ``where`` if invalid."""
        if props.get(_META_PREFIX + "format") != FORMAT_NAME:
            raise ModelError(f"{where} is an ONNX file but not a dhde model (no '{_META_PREFIX}format' metadata)")
        values: dict[str, object] = {}
        for f in fields(cls):
            key = _META_PREFIX + f.name
            if key not in props:
                raise ModelError(f"{where}: dhde model metadata lacks '{key}'")
            text = props[key]
            try:
                if f.name in ("features", "sigma_labels"):
                    values[f.name] = tuple(json.loads(text))
                elif f.name == "format_version":
                    values[f.name] = int(text)
                else:
                    values[f.name] = text
            except (ValueError, TypeError):
                raise ModelError(f"{where}: malformed metadata '{key}': {text!r}") from None
        if values["format_version"] != FORMAT_VERSION:
            raise ModelError(
                f"{where} is dhde model format version {values['format_version']}; "
                f"this dhde reads version {FORMAT_VERSION}"
            )
        return cls(**values)  # type: ignore[arg-type]

    @property
    def uses_patches(self) -> bool:
        """Whether the model computes the deep feature (and so needs colour patches)."""
        return DEEP_FEATURE in self.features


# ---------------------------------------------------------------------------
# Building the graph
# ---------------------------------------------------------------------------


def _weight(weights: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in weights:
        raise ModelError(f"weights lack '{key}'")
    array = np.asarray(weights[key], dtype=np.float32)
    if array.ndim != ndim:
        raise ModelError(f"weight '{key}' has shape {array.shape}, expected {ndim} dimensions")
    return array


def _fc_layer_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """fc1, fc2, ... for as long as the weights have them."""
    names = []
    while f"fc{len(names) + 1}.weight" in weights:
        names.append(f"fc{len(names) + 1}")
    if not names:
        raise ModelError("weights lack 'fc1.weight'")
    return names


def _conv_tower(weights: Mapping[str, np.ndarray], nodes: list, initializers: list) -> tuple[str, int]:
    """Nodes of the deep-feature tower from ``patch``; returns (output name, width)."""
    x, channels, size = PATCH_INPUT, 3, PATCH_SIZE
    for layer, pooled in _CONV_LAYERS:
        kernel = _weight(weights, f"{layer}.weight", 4)
        bias = _weight(weights, f"{layer}.bias", 1)
        out_channels, in_channels, kh, kw = kernel.shape
        if in_channels != channels or bias.shape != (out_channels,) or kh != kw or kh > size:
            raise ModelError(
                f"weights of {layer} have shapes {kernel.shape} and {bias.shape}, "
                f"which do not fit its {channels}×{size}×{size} input"
            )
        initializers += [numpy_helper.from_array(kernel, f"{layer}.weight"),
                         numpy_helper.from_array(bias, f"{layer}.bias")]
        nodes.append(helper.make_node("Conv", [x, f"{layer}.weight", f"{layer}.bias"], [layer],
                                      name=layer, kernel_shape=[kh, kw], strides=[1, 1]))
        nodes.append(helper.make_node("Relu", [layer], [f"{layer}_relu"], name=f"{layer}_relu"))
        x, channels, size = f"{layer}_relu", out_channels, size - kh + 1
        if pooled:
            # Caffe rounds the pooled size up: the last window is partial.
            nodes.append(helper.make_node("MaxPool", [x], [f"{layer}_pool"], name=f"{layer}_pool",
                                          kernel_shape=[_POOL_SIZE] * 2, strides=[_POOL_SIZE] * 2, ceil_mode=1))
            x, size = f"{layer}_pool", -(-size // _POOL_SIZE)
    if size != 1:
        raise ModelError(f"the conv layers reduce a {PATCH_SIZE}×{PATCH_SIZE} patch to {size}×{size}, not 1×1")
    nodes.append(helper.make_node("Flatten", [x], [DEEP_FEATURE], name="flatten_deep", axis=1))
    return DEEP_FEATURE, channels


def build_model(weights: Mapping[str, np.ndarray], metadata: ModelMetadata) -> onnx.ModelProto:
    """Build a dhde model (an ONNX graph with dhde metadata) from weights.

    Args:
        weights: float arrays by name. ``conv1``..``conv4`` (only if
            ``"deep" in metadata.features``): ``conv{k}.weight`` (out, in, kh, kw)
            and ``conv{k}.bias`` (out,), applied to the ``patch`` input in the
            model's ``patch_layout``; ``fc1``, ``fc2``, ...: ``fc{k}.weight``
            (out, in) and ``fc{k}.bias`` (out,), in Caffe's order (y = W·x + b).
            fc1's input is the concatenation of ``metadata.features``
            (40 entries per hand-crafted feature, conv4's channels for "deep");
            the last fc has one output per σ label.
        metadata: what the file will say about itself.

    Returns:
        The checked ONNX model (opset :data:`OPSET`).

    Raises:
        ModelError: a weight is missing, unused or of a shape that does not fit.
    """
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    concat_inputs: list[str] = []
    width = 0
    used = set()
    for feature in metadata.features:
        if feature == DEEP_FEATURE:
            inputs.append(helper.make_tensor_value_info(PATCH_INPUT, TensorProto.FLOAT, ["N", 3, PATCH_SIZE, PATCH_SIZE]))
            name, deep_width = _conv_tower(weights, nodes, initializers)
            used |= {f"{layer}.{kind}" for layer, _ in _CONV_LAYERS for kind in ("weight", "bias")}
            concat_inputs.append(name)
            width += deep_width
        else:
            inputs.append(helper.make_tensor_value_info(feature, TensorProto.FLOAT, ["N", HAND_FEATURE_LENGTH]))
            concat_inputs.append(feature)
            width += HAND_FEATURE_LENGTH
    nodes.append(helper.make_node("Concat", concat_inputs, ["fc_input"], name="concat", axis=1))

    x = "fc_input"
    fc_layers = _fc_layer_names(weights)
    for layer in fc_layers:
        matrix = _weight(weights, f"{layer}.weight", 2)
        bias = _weight(weights, f"{layer}.bias", 1)
        if matrix.shape[1] != width or bias.shape != (matrix.shape[0],):
            raise ModelError(
                f"weights of {layer} have shapes {matrix.shape} and {bias.shape}; its input has {width} entries"
            )
        initializers += [numpy_helper.from_array(matrix, f"{layer}.weight"),
                         numpy_helper.from_array(bias, f"{layer}.bias")]
        used |= {f"{layer}.weight", f"{layer}.bias"}
        nodes.append(helper.make_node("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], [layer], name=layer, transB=1))
        relu = "logits_relu" if layer == fc_layers[-1] else f"{layer}_relu"
        nodes.append(helper.make_node("Relu", [layer], [relu], name=f"{layer}_relu"))
        x, width = relu, matrix.shape[0]
    n_classes = len(metadata.sigma_labels)
    if width != n_classes:
        raise ModelError(f"the last fc layer has {width} outputs but the metadata has {n_classes} σ labels")
    unused = sorted(set(weights) - used)
    if unused:
        raise ModelError(f"weights not used by a model with features {list(metadata.features)}: {unused}")
    nodes.append(helper.make_node("Softmax", ["logits_relu"], ["prob"], name="softmax", axis=1))

    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", n_classes]) for name in ("prob", "logits_relu")]
    graph = helper.make_graph(nodes, "dhde", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dhde", producer_version=__version__)
    model.ir_version = IR_VERSION
    model.doc_string = metadata.description
    helper.set_model_props(model, metadata.to_props())
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Union[str, Path]) -> Path:
    """Write a model built by :func:`build_model` to ``path`` (parents created)."""
    path = Path(path)
    ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, "model to save")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.SerializeToString())
    except OSError as exc:
        raise ModelError(f"cannot write model {path}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------

#: Colour patches for :meth:`DefocusModel.predict`: one uint8 (N, 27, 27, 3)
#: array, or an iterable of (start, stop, patches) batches covering 0..N in order.
PatchSource = Union[np.ndarray, Iterable[tuple[int, int, np.ndarray]], None]


class DefocusModel:
    """A loaded dhde model: one onnxruntime session, reused for every call.

    >>> model = DefocusModel.load("authors.onnx", num_threads=2)   # doctest: +SKIP
    >>> prob = model.predict(f_dct_q, f_grd_q, f_svd_q, patches_u8)  # doctest: +SKIP
    """

    def __init__(self, model: onnx.ModelProto, where: str = "model", num_threads: Optional[int] = None):
        """Wrap an ONNX model (see :meth:`load`); ``where`` names it in errors."""
        self._props = {p.key: p.value for p in model.metadata_props}
        self._info = ModelMetadata.from_props(self._props, where)
        self._session = _make_session(model, where, DHDEConfig().num_threads if num_threads is None else num_threads)
        expected = {PATCH_INPUT if f == DEEP_FEATURE else f for f in self._info.features}
        found = {i.name for i in self._session.get_inputs()}
        if found != expected:
            raise ModelError(f"{where}: graph inputs {sorted(found)} do not match its features {list(self._info.features)}")

    @classmethod
    def load(cls, path: Union[str, Path], num_threads: Optional[int] = None) -> "DefocusModel":
        """Load a dhde model file.

        Args:
            path: the ``.onnx`` file.
            num_threads: onnxruntime intra-op threads; 0 = all cores;
                None = ``DHDEConfig().num_threads``.

        Raises:
            ModelError: the file is missing, not ONNX, not a dhde model, of
                another format version, or onnxruntime cannot run it.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from None
        try:
            model = onnx.load_model_from_string(raw)
        except Exception:  # protobuf raises several types for corrupt bytes
            raise ModelError(f"{path} is not an ONNX model file") from None
        if len(model.graph.node) == 0:
            # Arbitrary bytes can decode as an empty protobuf message.
            raise ModelError(f"{path} is not an ONNX model file (empty graph)")
        return cls(model, str(path), num_threads)

    @property
    def metadata(self) -> dict[str, str]:
        """The file's metadata, as stored (keys ``dhde.*``, string values)."""
        return dict(self._props)

    @property
    def info(self) -> ModelMetadata:
        """The file's metadata, parsed."""
        return self._info

    @property
    def sigma_labels(self) -> tuple[float, ...]:
        """σ (pixels) of each class, in the order of the probabilities' columns."""
        return self._info.sigma_labels

    @property
    def features(self) -> tuple[str, ...]:
        """Features the model uses, in fc1's input order."""
        return self._info.features

    @property
    def uses_patches(self) -> bool:
        """Whether :meth:`predict` needs colour patches."""
        return self._info.uses_patches

    def predict(
        self,
        f_dct_q: Optional[np.ndarray],
        f_grd_q: Optional[np.ndarray],
        f_svd_q: Optional[np.ndarray],
        patches_u8: PatchSource = None,
        batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Class probabilities of N patches.

        Args:
            f_dct_q, f_grd_q, f_svd_q: (N, 40) quantised features (float32
                0..255, see ``input_quantisation``); a feature the model does
                not use may be None.
            patches_u8: colour patches, uint8 (N, 27, 27, 3) [y, x, rgb] in
                the natural layout (the model's ``patch_layout`` is applied
                here), or an iterable of (start, stop, patches) batches that
                covers 0..N in order (e.g. produced lazily to bound memory);
                None if the model does not use the deep feature.
            batch_size: patches per onnxruntime call when ``patches_u8`` is an
                array (default ``DHDEConfig().network_batch``); results do not
                depend on it.

        Returns:
            prob: (N, n_classes) float32, rows sum to 1.
        """
        hand = {"dct": f_dct_q, "grd": f_grd_q, "svd": f_svd_q}
        used = {name: hand[name] for name in HAND_FEATURES if name in self.features}
        for name, values in used.items():
            if values is None or np.ndim(values) != 2 or np.shape(values)[1] != HAND_FEATURE_LENGTH:
                raise ValueError(f"feature '{name}' must be an (N, {HAND_FEATURE_LENGTH}) array")
        if self.uses_patches and patches_u8 is None:
            raise ValueError("this model uses the deep feature: colour patches are required")
        n = _patch_count(used, patches_u8 if self.uses_patches else None)

        if batch_size is None:
            batch_size = DHDEConfig().network_batch
        if not self.uses_patches:
            batches: Iterable[tuple[int, int, Optional[np.ndarray]]] = (
                (start, min(start + batch_size, n), None) for start in range(0, n, batch_size)
            )
        elif isinstance(patches_u8, np.ndarray):
            batches = _array_batches(patches_u8, batch_size)
        else:
            batches = patches_u8

        prob = np.empty((n, len(self.sigma_labels)), dtype=np.float32)
        covered = 0
        for start, stop, batch in batches:
            if start != covered or not start < stop <= n:
                raise ValueError(f"patch batches must cover 0..{n} in order; got [{start}, {stop}) after {covered}")
            feed = {name: np.ascontiguousarray(values[start:stop], dtype=np.float32) for name, values in used.items()}
            if batch is not None:
                feed[PATCH_INPUT] = self._patch_input(batch, stop - start)
            prob[start:stop] = self._session.run(["prob"], feed)[0]
            covered = stop
        if covered != n:
            raise ValueError(f"patch batches cover 0..{covered}, expected 0..{n}")
        return prob

    def _patch_input(self, batch: np.ndarray, count: int) -> np.ndarray:
        """(count, 27, 27, 3) uint8 natural patches → the model's float32 input."""
        if batch.shape != (count, PATCH_SIZE, PATCH_SIZE, 3):
            raise ValueError(f"a batch of {count} colour patches must be ({count}, {PATCH_SIZE}, {PATCH_SIZE}, 3), got {batch.shape}")
        return np.ascontiguousarray(batch.transpose(_PATCH_AXES[self._info.patch_layout]), dtype=np.float32)


def _patch_count(features: Mapping[str, np.ndarray], patches_u8: PatchSource) -> int:
    """N, checked to agree across the features (and the patch array)."""
    counts = {len(values) for values in features.values()}
    if isinstance(patches_u8, np.ndarray):
        counts.add(len(patches_u8))
    if len(counts) > 1:
        raise ValueError(f"features and patches disagree on the number of patches: {sorted(counts)}")
    if not counts:
        raise ValueError("a model that uses only the deep feature needs the patches as one array")
    return counts.pop()


def _array_batches(patches_u8: np.ndarray, batch_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    n = len(patches_u8)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, patches_u8[start:stop]


def _make_session(model: onnx.ModelProto, where: str, num_threads: int):
    """An onnxruntime CPU session for ``model``: sequential, ``num_threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(num_threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, unexported error types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: onnxruntime cannot load the model: {first_line}") from None


__all__ = [
    "DEEP_FEATURE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HAND_FEATURES",
    "KNOWN_FEATURES",
    "DefocusModel",
    "ModelMetadata",
    "PatchSource",
    "build_model",
    "save_model",
]
