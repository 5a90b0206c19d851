"""Read the authors' Caffe weights and convert them to dhde's model format.

``DHDE_model.caffemodel`` is a serialised Caffe ``NetParameter`` protobuf. We
decode it without Caffe, using the ``protobuf`` runtime (already required by
``onnx``) and a *minimal schema*: only the handful of messages and fields that
hold layer names and weight blobs, with Caffe's field numbers. Protobuf parsers
skip fields a schema does not declare, so this subset reads any full
caffemodel. We prefer it to a hand-written wire-format decoder because the
library validates the encoding (a corrupt file fails loudly) and accepts both
packed and unpacked float arrays, and the schema below reads like the
corresponding excerpt of Caffe's ``caffe.proto``.

Both layer encodings of Caffe 1.0 are read: the current ``layer`` (field
100, ``LayerParameter``) and the deprecated V1 ``layers`` (field 2,
``V1LayerParameter``); the pre-2014 "V0" encoding is not.
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from . import __version__
from .errors import ModelError
from .model import ModelMetadata, build_model, save_model

# Field numbers are Caffe's (src/caffe/proto/caffe.proto). Everything else in
# those messages (layer parameters, phases, learning rates, ...) is skipped.
_CAFFE_SUBSET_SCHEMA = """
name: "dhde_caffe_subset.proto"
package: "dhde_caffe"
syntax: "proto2"
message_type {
  name: "BlobShape"
  field { name: "dim" number: 1 label: LABEL_REPEATED type: TYPE_INT64 }
}
message_type {
  name: "BlobProto"
  field { name: "num" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "channels" number: 2 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "height" number: 3 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "width" number: 4 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "data" number: 5 label: LABEL_REPEATED type: TYPE_FLOAT }
  field { name: "shape" number: 7 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".dhde_caffe.BlobShape" }
  field { name: "double_data" number: 8 label: LABEL_REPEATED type: TYPE_DOUBLE }
}
message_type {
  name: "LayerParameter"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "type" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "bottom" number: 3 label: LABEL_REPEATED type: TYPE_STRING }
  field { name: "blobs" number: 7 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".dhde_caffe.BlobProto" }
}
message_type {
  name: "V1LayerParameter"
  field { name: "bottom" number: 2 label: LABEL_REPEATED type: TYPE_STRING }
  field { name: "name" number: 4 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "blobs" number: 6 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".dhde_caffe.BlobProto" }
}
message_type {
  name: "NetParameter"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "layers" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".dhde_caffe.V1LayerParameter" }
  field { name: "layer" number: 100 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".dhde_caffe.LayerParameter" }
}
"""

#: Weighted layers of the authors' net and the blob shapes dhde expects
#: ([weight, bias], Caffe order: conv (out, in, kh, kw), inner product (out, in)).
AUTHORS_LAYER_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "conv1": ((25, 3, 3, 3), (25,)),
    "conv2": ((50, 25, 3, 3), (50,)),
    "conv3": ((50, 50, 3, 3), (50,)),
    "conv4": ((25, 50, 1, 1), (25,)),
    "fc1": ((300, 145), (300,)),
    "fc2": ((150, 300), (150,)),
    "fc3": ((11, 150), (11,)),
}

#: Inputs of the authors' ``concat`` layer (the input of fc1), in order, and
#: the dhde feature each one carries.
AUTHORS_CONCAT_INPUTS: dict[str, str] = {
    "flattenDCT": "dct",
    "flattenGRD": "grd",
    "flattenSVD": "svd",
    "flattenIMG": "deep",
}


@lru_cache(maxsize=1)
def _net_parameter_class() -> type:
    """Message class of the minimal NetParameter schema (built once)."""
    file_proto = text_format.Parse(_CAFFE_SUBSET_SCHEMA, descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dhde_caffe.NetParameter"))


def _parse_net(path: Path):
    """Decode a caffemodel file into the minimal NetParameter message."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read Caffe model {path}: {exc.strerror or exc}") from None
    net = _net_parameter_class()()
    try:
        net.ParseFromString(raw)
    except DecodeError:
        raise ModelError(f"{path} is not a Caffe model (protobuf decoding failed)") from None
    if len(net.layer) == 0 and len(net.layers) == 0:
        raise ModelError(f"{path} is not a Caffe model (no layers found)")
    return net


def _blob_array(blob, layer_name: str, path: Path) -> np.ndarray:
    """One BlobProto as a float32 array of its declared shape.

    The shape comes from ``shape.dim`` or, in files older than Caffe's
    BlobShape, from the 4-d legacy ``num, channels, height, width``.
    """
    if len(blob.shape.dim) > 0:
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = blob.data if len(blob.data) > 0 else blob.double_data
    data = np.asarray(values, dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ModelError(
            f"{path}: layer {layer_name!r} has a blob of shape {shape} but {data.size} values"
        )
    return data.reshape(shape)


def _layer_blobs(net, path: Path) -> dict[str, list[np.ndarray]]:
    """``{layer name: blobs}`` of the layers of ``net`` that have weights."""
    return {
        layer.name: [_blob_array(blob, layer.name, path) for blob in layer.blobs]
        for layer in [*net.layers, *net.layer]
        if len(layer.blobs) > 0
    }


def read_caffemodel(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Weight blobs of every layer of a caffemodel that has any.

    Args:
        path: a Caffe ``.caffemodel`` (serialised ``NetParameter``).

    Returns:
        ``{layer name: [blob, ...]}`` in file order; each blob a float32 array
        of its stored shape (usually ``[weight, bias]``). Layers without blobs
        (ReLU, pooling, data, ...) are left out.

    Raises:
        ModelError: the file is missing, unreadable or not a caffemodel.
    """
    path = Path(path)
    return _layer_blobs(_parse_net(path), path)


def _fit_shape(blob: np.ndarray, shape: tuple[int, ...], what: str, path: Path) -> np.ndarray:
    """``blob`` reshaped to ``shape``, accepting legacy 4-d padding with ones.

    Legacy blobs store an inner product's (out, in) weight as (1, 1, out, in)
    and a bias as (1, 1, 1, out): same values, extra leading unit axes.
    """
    stored = tuple(blob.shape)
    while len(stored) > len(shape) and stored[0] == 1:
        stored = stored[1:]
    if stored != shape:
        raise ModelError(f"{path}: {what} has shape {tuple(blob.shape)}, expected {shape}")
    return blob.reshape(shape)


def authors_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The authors' weights as dhde's weight dict (see :func:`dhde.model.build_model`).

    Weights keep Caffe's own index order (so conv kernels still expect the
    authors' transposed patches; :func:`convert_caffemodel` deals with that).

    Raises:
        ModelError: the file is unreadable, or a layer is missing, has a blob
            of an unexpected shape, or fc1's inputs are not concatenated in
            the order of :data:`AUTHORS_CONCAT_INPUTS`.
    """
    path = Path(path)
    net = _parse_net(path)
    # The metadata states which feature enters fc1 where; check the file's
    # Concat layer agrees (a weights-only file without one is trusted).
    for layer in net.layer:
        if layer.type == "Concat" and list(layer.bottom) != list(AUTHORS_CONCAT_INPUTS):
            raise ModelError(f"{path}: fc1 input order is {list(layer.bottom)}, expected {list(AUTHORS_CONCAT_INPUTS)}")
    blobs = _layer_blobs(net, path)
    weights: dict[str, np.ndarray] = {}
    for layer, (weight_shape, bias_shape) in AUTHORS_LAYER_SHAPES.items():
        if layer not in blobs:
            raise ModelError(f"{path}: layer {layer!r} not found (is this the DHDE model?)")
        if len(blobs[layer]) != 2:
            raise ModelError(f"{path}: layer {layer!r} has {len(blobs[layer])} blobs, expected 2 (weight, bias)")
        weights[f"{layer}.weight"] = _fit_shape(blobs[layer][0], weight_shape, f"{layer} weight", path)
        weights[f"{layer}.bias"] = _fit_shape(blobs[layer][1], bias_shape, f"{layer} bias", path)
    return weights


def convert_caffemodel(
    caffemodel_path: str | Path,
    out_path: str | Path,
    description: str | None = None,
) -> Path:
    """Convert the authors' ``DHDE_model.caffemodel`` to a dhde model file.

    The authors fed each colour patch spatially transposed (``[n, c, x, y]``);
    the converted model takes natural ``[n, c, y, x]`` patches instead, with
    the transpose baked into the weights: the kernels of conv1..conv3 are
    transposed in their two spatial axes. This is exact (it only re-indexes
    the same numbers; max pooling with square windows commutes with the
    transpose, conv3's output is 1×1 and conv4 is 1×1).

    Args:
        caffemodel_path: the authors' Caffe weights.
        out_path: the model file to write (``.onnx``); parent folders are created.
        description: free text stored in the model's metadata.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ModelError: the caffemodel is missing, malformed, or not the DHDE net
            (missing layer, wrong blob shape, unexpected concat order).
    """
    caffemodel_path = Path(caffemodel_path)
    weights = authors_weights(caffemodel_path)

    for layer in ("conv1", "conv2", "conv3"):
        key = f"{layer}.weight"
        weights[key] = np.ascontiguousarray(weights[key].transpose(0, 1, 3, 2))

    metadata = ModelMetadata(
        features=tuple(AUTHORS_CONCAT_INPUTS.values()),
        patch_layout="natural",
        source=f"converted from {caffemodel_path.name} (Park et al., CVPR 2017, DHDE_CVPR17 release)",
        created=datetime.date.today().isoformat(),
        dhde_version=__version__,
        description=description
        or (
            "The authors' trained DHDE network. Their Caffe blobs held colour patches spatially "
            "transposed; the conv1-conv3 kernels are transposed here so that the model takes "
            "natural [n, c, y, x] patches."
        ),
    )
    out_path = Path(out_path)
    save_model(build_model(weights, metadata), out_path)
    return out_path


__all__ = [
    "AUTHORS_CONCAT_INPUTS",
    "AUTHORS_LAYER_SHAPES",
    "authors_weights",
    "convert_caffemodel",
    "read_caffemodel",
]
