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

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
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
        try:
            return cls(**values)  # type: ignore[arg-type]
        except (ModelError, ValueError, TypeError) as exc:
            raise ModelError(f"{where}: invalid dhde metadata: {exc}") from None

    @property
    def uses_patches(self) -> bool:
        """Whether the model computes the deep feature (and so needs colour patches)."""
        return DEEP_FEATURE in self.features


# ---------------------------------------------------------------------------
# The network's weights, checked
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One weighted layer: conv (kernel (out, in, k, k)) or fc (matrix (out, in))."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    pooled: bool = False  # conv only: a Caffe max pool follows the ReLU


@dataclass(frozen=True)
class _Network:
    """A model's layers, checked to fit each other and its metadata."""

    convs: tuple[_Layer, ...]  # deep-feature tower, empty if the model has none
    fcs: tuple[_Layer, ...]
    metadata: ModelMetadata


def _weight(weights: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in weights:
        raise ModelError(f"weights lack '{key}'")
    array = np.asarray(weights[key], dtype=np.float32)
    if array.ndim != ndim:
        raise ModelError(f"weight '{key}' has shape {array.shape}, expected {ndim} dimensions")
    return array


def _check_network(weights: Mapping[str, np.ndarray], metadata: ModelMetadata) -> _Network:
    """Layers of the network that ``metadata`` describes, from ``weights``.

    Raises:
        ModelError: a weight is missing, unused or of a shape that does not fit.
    """
    convs: list[_Layer] = []
    channels, size = 3, PATCH_SIZE
    if metadata.uses_patches:
        for name, pooled in _CONV_LAYERS:
            layer = _Layer(name, _weight(weights, f"{name}.weight", 4), _weight(weights, f"{name}.bias", 1), pooled)
            out_channels, in_channels, kh, kw = layer.weight.shape
            if in_channels != channels or layer.bias.shape != (out_channels,) or kh != kw or kh > size:
                raise ModelError(
                    f"weights of {name} have shapes {layer.weight.shape} and {layer.bias.shape}, "
                    f"which do not fit its {channels}×{size}×{size} input"
                )
            convs.append(layer)
            channels, size = out_channels, size - kh + 1
            if pooled:
                size = -(-size // _POOL_SIZE)  # Caffe rounds the pooled size up
        if size != 1:
            raise ModelError(f"the conv layers reduce a {PATCH_SIZE}×{PATCH_SIZE} patch to {size}×{size}, not 1×1")

    width = sum(channels if f == DEEP_FEATURE else HAND_FEATURE_LENGTH for f in metadata.features)
    fcs: list[_Layer] = []
    while f"fc{len(fcs) + 1}.weight" in weights or not fcs:
        name = f"fc{len(fcs) + 1}"
        layer = _Layer(name, _weight(weights, f"{name}.weight", 2), _weight(weights, f"{name}.bias", 1))
        if layer.weight.shape[1] != width or layer.bias.shape != (layer.weight.shape[0],):
            raise ModelError(
                f"weights of {name} have shapes {layer.weight.shape} and {layer.bias.shape}; "
                f"its input has {width} entries"
            )
        fcs.append(layer)
        width = layer.weight.shape[0]
    if width != len(metadata.sigma_labels):
        raise ModelError(
            f"the last fc layer has {width} outputs but the metadata has {len(metadata.sigma_labels)} σ labels"
        )
    unused = sorted(set(weights) - {f"{layer.name}.{kind}" for layer in convs + fcs for kind in ("weight", "bias")})
    if unused:
        raise ModelError(f"weights not used by a model with features {list(metadata.features)}: {unused}")
    return _Network(tuple(convs), tuple(fcs), metadata)


# ---------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------


class _GraphBuilder:
    """Accumulates ONNX nodes, initializers and inputs; names are the outputs."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape: list, elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv_relu(self, layer: _Layer, x: str) -> str:
        """Conv (stride 1, no padding) → ReLU."""
        kernel = self.const(f"{layer.name}.weight", layer.weight)
        bias = self.const(f"{layer.name}.bias", layer.bias)
        x = self.node("Conv", [x, kernel, bias], layer.name, kernel_shape=list(layer.weight.shape[2:]))
        return self.node("Relu", [x], f"{layer.name}_relu")

    def caffe_max_pool(self, layer: _Layer, x: str) -> str:
        # Caffe rounds the pooled size up: the last window is partial.
        return self.node("MaxPool", [x], f"{layer.name}_pool",
                         kernel_shape=[_POOL_SIZE] * 2, strides=[_POOL_SIZE] * 2, ceil_mode=1)

    def model(self, outputs: list[tuple[str, list]], name: str = "dhde") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, self.inputs,
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape) for out, shape in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="dhde", producer_version=__version__)
        model.ir_version = IR_VERSION
        return model


def _network_graph(net: _Network, convs: tuple[_Layer, ...], deep_input: Optional[str],
                   builder: _GraphBuilder) -> onnx.ModelProto:
    """Finish a graph: hand-crafted inputs, tower from ``convs``, classifier.

    ``convs`` are the tower's layers still to apply to ``deep_input`` (all of
    them to the ``patch`` input; fewer when ``deep_input`` is computed
    already). Inputs are declared in ``net.metadata.features`` order.
    """
    inputs: list[str] = []
    for feature in net.metadata.features:
        if feature != DEEP_FEATURE:
            inputs.append(builder.input(feature, ["N", HAND_FEATURE_LENGTH]))
            continue
        x = deep_input or builder.input(PATCH_INPUT, ["N", 3, PATCH_SIZE, PATCH_SIZE])
        for layer in convs:
            x = builder.conv_relu(layer, x)
            if layer.pooled:
                x = builder.caffe_max_pool(layer, x)
        inputs.append(builder.node("Flatten", [x], DEEP_FEATURE, axis=1))
    x = builder.node("Concat", inputs, "fc_input", axis=1)
    for layer in net.fcs:
        weight = builder.const(f"{layer.name}.weight", layer.weight)
        bias = builder.const(f"{layer.name}.bias", layer.bias)
        x = builder.node("Gemm", [x, weight, bias], layer.name, transB=1)
        # The last fc is ReLU'd too (the authors' fc3 → ReLU → softmax).
        x = builder.node("Relu", [x], "logits_relu" if layer is net.fcs[-1] else f"{layer.name}_relu")
    builder.node("Softmax", [x], "prob", axis=1)
    n_classes = len(net.metadata.sigma_labels)
    return builder.model([("prob", ["N", n_classes]), ("logits_relu", ["N", n_classes])])


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
    net = _check_network(weights, metadata)
    model = _network_graph(net, net.convs, None, _GraphBuilder())
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
# Execution graphs: equivalent to the model's graph, faster
# ---------------------------------------------------------------------------


def _simd_channel_block() -> int:
    """Channel block of onnxruntime's NCHWc conv kernels here: 16 with AVX-512, else 8.

    onnxruntime does not report it; numpy's CPU feature table tells AVX-512
    apart. If that (private) table is missing, 16: a multiple of 8 too, so
    right everywhere, at ~10 % more work on AVX2 machines.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return 16
    return 16 if __cpu_features__.get("AVX512F", True) else 8


#: Channel counts inside the tower are padded to a multiple of this at run
#: time (see _pad_conv_channels).
_CHANNEL_MULTIPLE = _simd_channel_block()


def _pad_conv_channels(convs: tuple[_Layer, ...], multiple: int) -> tuple[_Layer, ...]:
    """The tower with every conv's channels between layers zero-padded to ``multiple``.

    Exact: an added channel has zero kernel and bias, so it is 0 after the
    ReLU and the pool, and the next conv reads it with zero weights. Why:
    onnxruntime's blocked (NCHWc) convolution kernels, several times faster
    here, only apply to channel counts that are multiples of the SIMD block
    (8 with AVX2, 16 with AVX-512); 25 and 50 are not. The last conv keeps
    its outputs: they are the deep feature.
    """
    padded = []
    in_pad = 0
    for k, layer in enumerate(convs):
        out_channels = layer.weight.shape[0]
        out_pad = 0 if k == len(convs) - 1 else -out_channels % multiple
        weight = np.pad(layer.weight, ((0, out_pad), (0, in_pad), (0, 0), (0, 0)))
        padded.append(dataclasses.replace(layer, weight=weight, bias=np.pad(layer.bias, (0, out_pad))))
        in_pad = out_pad
    return tuple(padded)


def _patch_execution_graph(net: _Network) -> onnx.ModelProto:
    """The model's graph with the tower's channels padded for speed (same results)."""
    return _network_graph(net, _pad_conv_channels(net.convs, _CHANNEL_MULTIPLE), None, _GraphBuilder())


# --- the shared first layer: one conv1 + pool1 per image, not per patch ----
#
# A scale-1 colour patch is a 27×27 window of the padded image, so conv1 over
# the whole padded image holds conv1 of every such patch: patch (y, x)'s
# conv1 output (a, b) is the image's conv1 at (y + a, x + b). Pool1 output
# (i, j) of the patch is then the max of the image's conv1 over the window
# starting at (y + 3i, x + 3j), 3×3 except that Caffe's last window (i or
# j = 8) is partial: it covers only the last conv1 row/column of the patch
# (25 = 8·3 + 1). So four stride-1 max maps of the image's conv1 (window
# heights × widths in {3, last} × {3, last}) hold every patch's pool1, and
# a patch's pool1 is a gather from them. Conv2 onward stays per patch.
#
# onnxruntime computes conv1 in its blocked channel layout; the image head
# returns it once, channels last, and the window maxima are taken in numpy
# (:func:`_window_max_maps`). Computing the four maps in the graph as well
# cost ~3× more (0.43 against 0.13 s on 0001, one thread): each map had to
# be converted out of the blocked layout, then concatenated and transposed.


def _pool_geometry(conv1: _Layer) -> tuple[int, int, int]:
    """(conv1 output side, pool1 output side, last pool1 window side)."""
    conv_side = PATCH_SIZE - conv1.weight.shape[2] + 1
    pool_side = -(-conv_side // _POOL_SIZE)
    return conv_side, pool_side, conv_side - _POOL_SIZE * (pool_side - 1)


def _image_head_graph(conv1: _Layer) -> onnx.ModelProto:
    """Graph: padded image (1, 3, H, W) → ReLU(conv1) (1, H', W', C), channels last, H' = H − k + 1."""
    b = _GraphBuilder()
    relu = b.conv_relu(conv1, b.input("image", [1, 3, "H", "W"]))
    b.node("Transpose", [relu], "conv1_map", perm=[0, 2, 3, 1])
    return b.model([("conv1_map", [1, "H1", "W1", conv1.weight.shape[0]])], name="dhde_image_head")


def _window_max_maps(conv1_map: np.ndarray, last: int) -> tuple[np.ndarray, dict[tuple[int, int], tuple[int, int]]]:
    """Every patch's pool1 candidates from a (H', W', C) conv1 map: stride-1 window maxima.

    For each window size (h, w) in {3, last}², the map whose entry (u, v)
    is the max over the h×w window with top left (u, v), for the windows
    inside the map ((H' − h + 1) × (W' − w + 1): all a patch reaches). The
    maps are stacked in one array so that the pooled tail needs one gather.

    Returns:
        flat_maps: (M, C) float32, the maps' rows one after another.
        layout: (h, w) → (first row in ``flat_maps``, map width).
    """
    height, width, channels = conv1_map.shape
    layout, base = {}, 0
    for h, w in sorted({(h, w) for h in (_POOL_SIZE, last) for w in (_POOL_SIZE, last)}):
        layout[(h, w)] = (base, width - w + 1)
        base += (height - h + 1) * (width - w + 1)
    flat_maps = np.empty((base, channels), dtype=np.float32)

    def slot(h: int, w: int) -> np.ndarray:
        start, map_width = layout[(h, w)]
        return flat_maps[start : start + (height - h + 1) * map_width].reshape(height - h + 1, map_width, channels)

    def running_max(values: np.ndarray, size: int, axis: int, out: np.ndarray) -> None:
        length = values.shape[axis] - size + 1
        take = (lambda k: values[k : k + length]) if axis == 0 else (lambda k: values[:, k : k + length])
        if size == 1:
            np.copyto(out, take(0))
        else:
            np.maximum(take(0), take(1), out=out)
            for k in range(2, size):
                np.maximum(out, take(k), out=out)

    for h in {_POOL_SIZE, last}:
        # Maxima over h rows first; that h×1 map is one of the kept maps only if last = 1.
        tall = slot(h, 1) if (h, 1) in layout else np.empty((height - h + 1, width, channels), np.float32)
        running_max(conv1_map, h, 0, tall)
        for w in {_POOL_SIZE, last} - {1}:
            running_max(tall, w, 1, slot(h, w))
    return flat_maps, layout


def _pool1_index(tops: np.ndarray, lefts: np.ndarray, layout: dict[tuple[int, int], tuple[int, int]],
                 pool_side: int, last: int) -> np.ndarray:
    """Rows of the stacked maps that form each patch's pool1.

    Args:
        tops, lefts: (n,) int, top-left conv1-map position of each patch's window.
        layout: as returned by :func:`_window_max_maps`.
        pool_side: P.
        last: side of the last (partial) pool window.

    Returns:
        (n, P·P) int64, entry i·P + j for pool1 output (i, j).
    """
    side = [_POOL_SIZE] * (pool_side - 1) + [last]  # window height (row i) or width (column j)
    # Cell (i, j) reads map (side[i], side[j]) at (top + 3i, left + 3j).
    starts, widths = np.array([[layout[(h, w)] for w in side] for h in side], dtype=np.int64).reshape(-1, 2).T
    cell_offsets = starts + _POOL_SIZE * (np.repeat(np.arange(pool_side), pool_side) * widths
                                      + np.tile(np.arange(pool_side), pool_side))
    tops = np.asarray(tops, dtype=np.int64)[:, None]
    lefts = np.asarray(lefts, dtype=np.int64)[:, None]
    return tops * widths[None, :] + lefts + cell_offsets[None, :]


# --- the other patches: conv1 + pool1 over a mosaic of them ---------------
#
# A scale-2 patch (15×15 grown to 27×27 by replicating its border) is not a
# window of the image, so it cannot share the image's conv1. Run through the
# whole network one by one, its conv1 is onnxruntime's least efficient layer
# (27×27 inputs of 3 channels: ~2.5× slower per output than one big image).
# Laid out as tiles of a mosaic image, the patches get the big-image speed:
# each tile is the patch plus 3 more replicated rows and columns (30×30,
# a multiple of the pool stride, so every tile's pool windows start on its
# own first row). Then a plain max-pool 3/3 over the mosaic's conv1 gives
# each tile's pool1 exactly: windows 0-7 lie inside the patch, and window 8
# covers the patch's last conv1 row (24) and rows 25 and 26, which see only
# copies of the patch's last rows, as row 24 does, so they equal it and
# the max is Caffe's partial window. (This holds because the patch's last
# three rows and columns are already copies: true of every scale-2 patch.)

#: Side of a mosaic tile: the 27×27 patch plus 3 replicated rows/columns.
_TILE = PATCH_SIZE + _POOL_SIZE


def _tile_head_graph(conv1: _Layer) -> onnx.ModelProto:
    """Graph: mosaic image (1, 3, 30·r, 30·c) → pool1 map (1, 10·r − 1, 10·c − 1, C), channels last."""
    b = _GraphBuilder()
    relu = b.conv_relu(conv1, b.input("image", [1, 3, "H", "W"]))
    pooled = b.node("MaxPool", [relu], "pool1", kernel_shape=[_POOL_SIZE] * 2, strides=[_POOL_SIZE] * 2)
    b.node("Transpose", [pooled], "pool_maps", perm=[0, 2, 3, 1])
    return b.model([("pool_maps", [1, "H1", "W1", conv1.weight.shape[0]])], name="dhde_tile_head")


def _pooled_tail_graph(net: _Network) -> onnx.ModelProto:
    """Graph: (flattened pool maps, per-patch gather index, features) → prob.

    Inputs ``pool_maps`` (M, C) float32 (the head's output reshaped) and
    ``pool_index`` (N, P·P) int64 rows of it forming each patch's P×P pool1.
    """
    convs = _pad_conv_channels(net.convs, _CHANNEL_MULTIPLE)
    _, pool_side, _ = _pool_geometry(convs[0])
    channels = convs[0].weight.shape[0]
    b = _GraphBuilder()
    maps = b.input("pool_maps", ["M", channels])
    index = b.input("pool_index", ["N", pool_side * pool_side], TensorProto.INT64)
    rows = b.node("Gather", [maps, index], "pool1_rows", axis=0)
    shape = b.const("pool1_shape", np.array([-1, pool_side, pool_side, channels], dtype=np.int64))
    nhwc = b.node("Reshape", [rows, shape], "pool1_nhwc")
    pool1 = b.node("Transpose", [nhwc], "pool1", perm=[0, 3, 1, 2])
    return _network_graph(net, convs[1:], pool1, b)


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------

#: Colour patches for :meth:`DefocusModel.predict`: one uint8 (N, 27, 27, 3)
#: array, or an iterable of (start, stop, patches) batches covering 0..N in order.
PatchSource = Union[np.ndarray, Iterable[tuple[int, int, np.ndarray]], None]

#: Upper bound on the pool maps of one band of image rows in the shared-conv1
#: path (four conv1-sized maps of window maxima, plus conv1 itself): bounds
#: memory. Measured with the maps computed in numpy (network alone on 0001,
#: medians of 5): 8 MiB (24 bands of 27 rows, each recomputing 26 overlap
#: rows) and 32 MiB (7 bands) within run-to-run noise of each other
#: (1.85-2.05 s CPU), 64 MiB ~15 % slower (maps no longer cache-friendly).
_POOL_MAP_BYTES = 32 * 2**20


#: Mosaics of the scale-2 path: 128 tiles, 16 to a row (240 × 480 pixels).
#: Measured on image 0001's 7,191 scale-2 patches (one thread, the whole
#: network): 128 or 256 tiles per mosaic ~0.7-0.8 s, 512-2048 tiles 1.6-1.9 s
#: (onnxruntime's conv1 output then outgrows the allocator's reusable
#: blocks), one patch at a time 1.2-1.4 s.
_TILES_PER_MOSAIC = 128
_TILES_PER_ROW = 16


class DefocusModel:
    """A loaded dhde model; its onnxruntime sessions are made once and reused.

    The file's graph defines the network. Runs use equivalent graphs built
    from the file's weights: the tower's channels zero-padded (exact, faster
    kernels), and, in :meth:`predict_image`, conv1 and pool1 computed once
    per image for the scale-1 patches and once per mosaic of patches for the
    scale-2 ones, instead of once per patch. Results agree with the file's graph
    to float32 rounding (differences ~1e-6 in probability).

    >>> model = DefocusModel.load("authors.onnx", num_threads=2)   # doctest: +SKIP
    >>> prob = model.predict(f_dct_q, f_grd_q, f_svd_q, patches_u8)  # doctest: +SKIP
    """

    def __init__(self, model: onnx.ModelProto, where: str = "model", num_threads: Optional[int] = None):
        """Wrap an ONNX model (see :meth:`load`); ``where`` names it in errors.

        Raises:
            ModelError: not a dhde model, or its graph is not the network
                that :func:`build_model` makes from its weights.
        """
        self._where = where
        self._props = {p.key: p.value for p in model.metadata_props}
        self._info = ModelMetadata.from_props(self._props, where)
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        try:
            self._net = _check_network(weights, self._info)
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None
        # The runner executes graphs derived from the weights, so the file's
        # graph must be exactly the network those weights define.
        if list(_network_graph(self._net, self._net.convs, None, _GraphBuilder()).graph.node) != list(model.graph.node):
            raise ModelError(f"{where}: its graph is not the dhde network (write models with dhde.model.build_model)")
        self._num_threads = DHDEConfig().num_threads if num_threads is None else num_threads

    @classmethod
    def load(cls, path: Union[str, Path], num_threads: Optional[int] = None) -> "DefocusModel":
        """Load a dhde model file.

        Args:
            path: the ``.onnx`` file.
            num_threads: onnxruntime intra-op threads; 0 = all cores;
                None = ``DHDEConfig().num_threads``.

        Raises:
            ModelError: the file is missing, not ONNX, not a dhde model or of
                another format version. (onnxruntime sessions are made on
                first use; their failures are ModelErrors too.)
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
        """Whether the model needs colour patches (it computes the deep feature)."""
        return self._info.uses_patches

    # --- sessions, made on first use ----------------------------------------

    def prepare(self) -> None:
        """Create the onnxruntime sessions now rather than on first use.

        A pipeline calls this in a background thread while it reads and edge-
        detects its first image, which hides session creation from a cold run.
        """
        if self.uses_patches:
            self._head_session, self._tile_head_session, self._tail_session  # noqa: B018 (cached)
        else:
            self._patch_session  # noqa: B018 (cached)


    @cached_property
    def _padded_convs(self) -> tuple[_Layer, ...]:
        return _pad_conv_channels(self._net.convs, _CHANNEL_MULTIPLE)

    @cached_property
    def _patch_session(self):
        return _make_session(_patch_execution_graph(self._net), self._where, self._num_threads)

    @cached_property
    def _head_session(self):
        return _make_session(_image_head_graph(self._padded_convs[0]), self._where, self._num_threads)

    @cached_property
    def _tile_head_session(self):
        return _make_session(_tile_head_graph(self._padded_convs[0]), self._where, self._num_threads)

    @cached_property
    def _tail_session(self):
        return _make_session(_pooled_tail_graph(self._net), self._where, self._num_threads)

    # --- inference ----------------------------------------------------------

    def predict(
        self,
        f_dct_q: Optional[np.ndarray],
        f_grd_q: Optional[np.ndarray],
        f_svd_q: Optional[np.ndarray],
        patches_u8: PatchSource = None,
        batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Class probabilities of N patches, each patch run through the whole network.

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
        hand = self._hand_features(f_dct_q, f_grd_q, f_svd_q)
        if self.uses_patches and patches_u8 is None:
            raise ValueError("this model uses the deep feature: colour patches are required")
        counts = {len(values) for values in hand.values()}
        if isinstance(patches_u8, np.ndarray):
            counts.add(len(patches_u8))
        if len(counts) != 1:
            raise ValueError(f"features and patches disagree on the number of patches: {sorted(counts) or 'none given'}")
        n = counts.pop()
        batch_size = batch_size or DHDEConfig().network_batch

        if not self.uses_patches:
            batches: Iterable[tuple[int, int, Optional[np.ndarray]]] = _ranges(n, batch_size, None)
        elif isinstance(patches_u8, np.ndarray):
            batches = _ranges(n, batch_size, patches_u8)
        else:
            batches = patches_u8

        return self._run_patch_batches(hand, batches, n)

    def _run_patch_batches(self, hand: Mapping[str, np.ndarray], batches: Iterable, n: int) -> np.ndarray:
        """Run (start, stop, patches) batches covering 0..n through the per-patch graph."""
        prob = np.empty((n, len(self.sigma_labels)), dtype=np.float32)
        covered = 0
        for start, stop, batch in batches:
            if start != covered or not start < stop <= n:
                raise ValueError(f"patch batches must cover 0..{n} in order; got [{start}, {stop}) after {covered}")
            feed = _feed(hand, start, stop)
            if self.uses_patches:
                feed[PATCH_INPUT] = self._patch_input(batch, stop - start)
            prob[start:stop] = self._patch_session.run(["prob"], feed)[0]
            covered = stop
        if covered != n:
            raise ValueError(f"patch batches cover 0..{covered}, expected 0..{n}")
        return prob

    def predict_image(
        self,
        f_dct_q: Optional[np.ndarray],
        f_grd_q: Optional[np.ndarray],
        f_svd_q: Optional[np.ndarray],
        rgb_u8: np.ndarray,
        positions: np.ndarray,
        scales: np.ndarray,
        batch_size: Optional[int] = None,
        fast: bool = True,
    ) -> np.ndarray:
        """Class probabilities of the patches of one image, cut here.

        Colour patches are those of ALGORITHM.md §3 (:func:`dhde.patches.colour_patches`).
        With ``fast`` (same results to float32 rounding), scale-1 patches
        (27×27 windows of the padded image) share one conv1 + pool1 pass
        over the image (see ``_image_head_graph``). Scale-2 patches (15×15
        grown to 27×27 by border replication) are not windows of the image;
        they are laid out as tiles of mosaic images that share conv1 + pool1
        the same way (see ``_tile_head_graph``).

        Args:
            f_dct_q, f_grd_q, f_svd_q: (N, 40) quantised features, as for :meth:`predict`.
            rgb_u8: (H, W, 3) uint8 RGB image, unpadded.
            positions: (N, 2) int [row, col] patch centres.
            scales: (N,) patch scale, 1 or 2.
            batch_size: patches per onnxruntime call (default
                ``DHDEConfig().network_batch``); results do not depend on it.
            fast: False runs every patch through the whole network, as
                :meth:`predict` does (the reference).

        Returns:
            prob: (N, n_classes) float32.
        """
        positions = np.asarray(positions)
        scales = np.asarray(scales)
        n = len(positions)
        if rgb_u8.dtype != np.uint8 or rgb_u8.ndim != 3 or rgb_u8.shape[2] != 3:
            raise ValueError(f"rgb_u8 must be an (H, W, 3) uint8 image, got {rgb_u8.dtype} {rgb_u8.shape}")
        if positions.shape != (n, 2) or scales.shape != (n,):
            raise ValueError(f"positions must be (N, 2) and scales (N,), got {positions.shape} and {scales.shape}")
        if n and ((positions < 0).any() or (positions >= rgb_u8.shape[:2]).any()):
            raise ValueError("patch positions must lie inside the image")
        hand = self._hand_features(f_dct_q, f_grd_q, f_svd_q)
        if any(len(values) != n for values in hand.values()):
            raise ValueError(f"features and positions disagree on the number of patches ({n} positions)")
        batch_size = batch_size or DHDEConfig().network_batch
        if not self.uses_patches:
            return self.predict(f_dct_q, f_grd_q, f_svd_q, None, batch_size)

        from . import patches  # the patch stage; imported here to keep dhde.model light

        pad = PATCH_SIZE // 2
        rgb_padded = patches.pad_replicate(rgb_u8, pad)
        if not fast:  # the reference: every patch cut and run through the whole network
            batches = (
                (start, stop, patches.colour_patches(rgb_padded, pad, positions[start:stop], scales[start:stop]))
                for start, stop, _ in _ranges(n, batch_size, None)
            )
            return self._run_patch_batches(hand, batches, n)

        prob = np.empty((n, len(self.sigma_labels)), dtype=np.float32)
        windows = np.flatnonzero(scales == 1)
        if len(windows):
            prob[windows] = self._predict_windows(rgb_padded, positions[windows], _subset(hand, windows), batch_size)
        tiles = np.flatnonzero(scales != 1)
        if len(tiles):
            prob[tiles] = self._predict_tiles(rgb_padded, pad, positions[tiles], scales[tiles],
                                              _subset(hand, tiles), batch_size)
        return prob

    def _predict_windows(self, rgb_padded: np.ndarray, positions: np.ndarray,
                         hand: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
        """Probabilities of patches that are 27×27 windows of ``rgb_padded``.

        The image is processed in bands of rows so that the pool maps stay
        under ``_POOL_MAP_BYTES``; each band's conv1 covers the rows its
        patches need (consecutive bands overlap by the patch size − 1 rows).
        """
        image = rgb_padded
        if self._info.patch_layout == "transposed":
            # The network sees patches transposed: use the transposed image.
            image, positions = rgb_padded.transpose(1, 0, 2), positions[:, ::-1]
        conv1 = self._padded_convs[0]
        conv_side, pool_side, last = _pool_geometry(conv1)
        map_width = image.shape[1] - conv1.weight.shape[2] + 1
        # conv1 and its window maxima: up to four maps of this size.
        row_bytes = 4 * map_width * conv1.weight.shape[0] * np.dtype(np.float32).itemsize
        # At least a patch's height of rows per band, so overlaps cost ≤ 2×.
        band_rows = max(PATCH_SIZE, _POOL_MAP_BYTES // row_bytes - (conv_side - 1))

        prob = np.empty((len(positions), len(self.sigma_labels)), dtype=np.float32)
        band_of = positions[:, 0] // band_rows
        for band in np.unique(band_of):
            chosen = np.flatnonzero(band_of == band)
            top = band * band_rows  # first patch-window row of the band, padded coordinates
            bottom = min(image.shape[0], top + band_rows + PATCH_SIZE - 1)
            band_image = np.ascontiguousarray(image[top:bottom].transpose(2, 0, 1)[None], dtype=np.float32)
            conv1_map = self._head_session.run(["conv1_map"], {"image": band_image})[0][0]
            flat_maps, layout = _window_max_maps(conv1_map, last)
            sub = _subset(hand, chosen)
            for start, stop, _ in _ranges(len(chosen), batch_size, None):
                rows = positions[chosen[start:stop], 0] - top
                cols = positions[chosen[start:stop], 1]
                feed = _feed(sub, start, stop)
                feed["pool_maps"] = flat_maps
                feed["pool_index"] = _pool1_index(rows, cols, layout, pool_side, last)
                prob[chosen[start:stop]] = self._tail_session.run(["prob"], feed)[0]
        return prob

    def _predict_tiles(self, rgb_padded: np.ndarray, pad: int, positions: np.ndarray, scales: np.ndarray,
                       hand: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
        """Probabilities of patches whose last 3 rows and columns replicate their border (scale 2).

        Every ``_TILES_PER_MOSAIC`` patches become a mosaic of 30×30 tiles
        (see ``_tile_head_graph``), ``_TILES_PER_ROW`` to a row; one conv1 +
        pool1 pass over the mosaic feeds the shared tail. ``batch_size``
        only caps the mosaic (results do not depend on either).
        """
        from . import patches  # the patch stage; imported here to keep dhde.model light

        channels = self._padded_convs[0].weight.shape[0]
        cells = _pool_geometry(self._padded_convs[0])[1]
        prob = np.empty((len(positions), len(self.sigma_labels)), dtype=np.float32)
        for start, stop, _ in _ranges(len(positions), min(batch_size, _TILES_PER_MOSAIC), None):
            batch = patches.colour_patches(rgb_padded, pad, positions[start:stop], scales[start:stop])
            if self._info.patch_layout == "transposed":
                batch = batch.transpose(0, 2, 1, 3)
            count = stop - start
            rows = -(-count // _TILES_PER_ROW)
            columns = min(count, _TILES_PER_ROW)
            tiles = np.empty((rows * columns, _TILE, _TILE, 3), dtype=np.float32)
            tiles[:count, :PATCH_SIZE, :PATCH_SIZE] = batch
            tiles[:count, PATCH_SIZE:, :PATCH_SIZE] = tiles[:count, PATCH_SIZE - 1:PATCH_SIZE, :PATCH_SIZE]
            tiles[:count, :, PATCH_SIZE:] = tiles[:count, :, PATCH_SIZE - 1:PATCH_SIZE]
            tiles[count:] = 0.0  # unused places of the last mosaic row
            mosaic = tiles.reshape(rows, columns, _TILE, _TILE, 3).transpose(4, 0, 2, 1, 3)
            mosaic = np.ascontiguousarray(mosaic.reshape(1, 3, rows * _TILE, columns * _TILE))
            maps = self._tile_head_session.run(["pool_maps"], {"image": mosaic})[0][0]
            # Tile t's pool1 cell (i, j) is map position (10·row(t) + i, 10·col(t) + j).
            tile = np.arange(count)
            top = (tile // columns) * (_TILE // _POOL_SIZE)
            left = (tile % columns) * (_TILE // _POOL_SIZE)
            offsets = np.arange(cells)
            index = ((top[:, None, None] + offsets[None, :, None]) * maps.shape[1]
                     + left[:, None, None] + offsets[None, None, :]).reshape(count, cells * cells)
            feed = _feed(hand, start, stop)
            feed["pool_maps"] = maps.reshape(-1, channels)
            feed["pool_index"] = index.astype(np.int64)
            prob[start:stop] = self._tail_session.run(["prob"], feed)[0]
        return prob

    def _hand_features(self, *arrays: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        """The hand-crafted features the model uses, checked, by input name."""
        used = {}
        for name, values in zip(HAND_FEATURES, arrays):
            if name not in self.features:
                continue
            if values is None or np.ndim(values) != 2 or np.shape(values)[1] != HAND_FEATURE_LENGTH:
                raise ValueError(f"feature '{name}' must be an (N, {HAND_FEATURE_LENGTH}) array")
            used[name] = values
        return used

    def _patch_input(self, batch: Optional[np.ndarray], count: int) -> np.ndarray:
        """(count, 27, 27, 3) uint8 natural patches → the graph's float32 input, in the model's layout."""
        if batch is None or batch.shape != (count, PATCH_SIZE, PATCH_SIZE, 3):
            shape = None if batch is None else batch.shape
            raise ValueError(f"a batch of {count} colour patches must be ({count}, {PATCH_SIZE}, {PATCH_SIZE}, 3), got {shape}")
        return np.ascontiguousarray(batch.transpose(_PATCH_AXES[self._info.patch_layout]), dtype=np.float32)


def _ranges(n: int, batch_size: int, patches_u8: Optional[np.ndarray]) -> Iterator[tuple[int, int, Optional[np.ndarray]]]:
    """(start, stop, patches[start:stop] or None) batches covering 0..n."""
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, None if patches_u8 is None else patches_u8[start:stop]


def _subset(features: Mapping[str, np.ndarray], chosen: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[chosen] for name, values in features.items()}


def _feed(features: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[start:stop], dtype=np.float32) for name, values in features.items()}


def _make_session(model: onnx.ModelProto, where: str, num_threads: int):
    """An onnxruntime CPU session for ``model``: sequential, ``num_threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(num_threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between parallel sections: three sessions take turns
    # (and other stages, other processes share the cores), and a spinning
    # idle pool steals the cores the running one needs. Measured on 2 cores
    # under load: 20-25 % faster, 25 % less CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Input shapes change with every image (the whole-image conv layers, the
    # last partial batch). onnxruntime's arena and its per-shape memory
    # patterns then grow without bound: a long-lived estimator went from
    # 1.1 GB to 1.9 GB over 12 CUHK images, and an evaluation worker was
    # OOM-killed at 7.3 GB after ~100. Without them: 0.2-0.45 GB, flat.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, unexported error types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: onnxruntime cannot run the model: {first_line}") from None


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
