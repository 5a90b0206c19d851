"""Reading the authors' caffemodel without Caffe, and converting it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dhde.caffe import (
    AUTHORS_LAYER_SHAPES,
    _net_parameter_class,
    authors_weights,
    convert_caffemodel,
    read_caffemodel,
)
from dhde.errors import ModelError
from dhde.model import DefocusModel


@pytest.fixture(scope="module")
def authors_blobs(caffemodel_path):
    return read_caffemodel(caffemodel_path)


def _write_net(path, layers, legacy_v1=False):
    """Serialise {name: [blob arrays]} as a NetParameter (V1 ``layers`` with
    legacy 4-d blob dims if ``legacy_v1``, else ``layer`` with BlobShape)."""
    net = _net_parameter_class()()
    for name, blobs in layers.items():
        layer = net.layers.add() if legacy_v1 else net.layer.add()
        layer.name = name
        for array in blobs:
            blob = layer.blobs.add()
            blob.data.extend(array.ravel().tolist())
            if legacy_v1:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
            else:
                blob.shape.dim.extend(array.shape)
    path.write_bytes(net.SerializeToString())
    return path


def test_read_caffemodel_finds_the_weighted_layers(authors_blobs):
    assert list(authors_blobs) == list(AUTHORS_LAYER_SHAPES)
    for name, shapes in AUTHORS_LAYER_SHAPES.items():
        assert [b.shape for b in authors_blobs[name]] == list(shapes)
        assert all(b.dtype == np.float32 and np.isfinite(b).all() for b in authors_blobs[name])
    # Numbers stated by the reference README.
    assert sum(b.size for blobs in authors_blobs.values() for b in blobs) == 126_436
    assert not authors_blobs["fc1"][1].any()


def test_v1_layers_with_legacy_blob_dims_read_the_same(tmp_path, authors_blobs):
    path = _write_net(tmp_path / "v1.caffemodel", authors_blobs, legacy_v1=True)
    assert read_caffemodel(path)["fc1"][0].shape == (1, 1, 300, 145)
    legacy = authors_weights(path)
    for name, blobs in authors_blobs.items():
        np.testing.assert_array_equal(legacy[f"{name}.weight"], blobs[0])
        np.testing.assert_array_equal(legacy[f"{name}.bias"], blobs[1])


def test_convert_transposes_the_conv_kernels(tmp_path, caffemodel_path, authors_blobs):
    out = convert_caffemodel(caffemodel_path, tmp_path / "sub" / "authors.onnx")
    assert out.is_file()
    model = DefocusModel.load(out)
    assert model.features == ("dct", "grd", "svd", "deep")
    assert model.info.patch_layout == "natural"
    assert np.allclose(model.sigma_labels, 0.5 + 0.15 * np.arange(11))
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for name in AUTHORS_LAYER_SHAPES:
        expected = authors_blobs[name][0]
        if name in ("conv1", "conv2", "conv3"):
            expected = expected.transpose(0, 1, 3, 2)
        np.testing.assert_array_equal(stored[f"{name}.weight"], expected)
        np.testing.assert_array_equal(stored[f"{name}.bias"], authors_blobs[name][1])


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        read_caffemodel(tmp_path / "absent.caffemodel")


@pytest.mark.parametrize(
    "content", [b"", b"\xff" * 64, b"not a protobuf at all, just some text\n"], ids=["empty", "garbage", "text"]
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a Caffe model"):
        convert_caffemodel(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_file(tmp_path, caffemodel_path):
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(caffemodel_path.read_bytes()[:100_000])
    with pytest.raises(ModelError, match="not a Caffe model"):
        read_caffemodel(path)


def test_missing_layer(tmp_path, authors_blobs):
    layers = {k: v for k, v in authors_blobs.items() if k != "conv3"}
    path = _write_net(tmp_path / "no_conv3.caffemodel", layers)
    with pytest.raises(ModelError, match="'conv3' not found"):
        convert_caffemodel(path, tmp_path / "out.onnx")


def test_shape_mismatch(tmp_path, authors_blobs):
    layers = dict(authors_blobs)
    layers["fc2"] = [authors_blobs["fc2"][0][:, :200], authors_blobs["fc2"][1]]
    path = _write_net(tmp_path / "narrow_fc2.caffemodel", layers)
    with pytest.raises(ModelError, match=r"fc2 weight has shape \(150, 200\), expected \(150, 300\)"):
        convert_caffemodel(path, tmp_path / "out.onnx")


def test_unexpected_concat_order(tmp_path, authors_blobs):
    path = _write_net(tmp_path / "swapped.caffemodel", authors_blobs)
    net = _net_parameter_class()()
    net.ParseFromString(path.read_bytes())
    concat = net.layer.add()
    concat.name, concat.type = "concat", "Concat"
    concat.bottom.extend(["flattenGRD", "flattenDCT", "flattenSVD", "flattenIMG"])
    path.write_bytes(net.SerializeToString())
    with pytest.raises(ModelError, match="fc1 input order"):
        convert_caffemodel(path, tmp_path / "out.onnx")
