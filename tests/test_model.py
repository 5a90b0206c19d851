"""dhde's model format and runner: parity with the authors' network, round trips, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dhde.caffe import authors_weights
from dhde.errors import ModelError
from dhde.model import DefocusModel, ModelMetadata, build_model, save_model

N_FIRST = 256


@pytest.fixture(scope="module")
def authors_model(authors_model_path):
    return DefocusModel.load(authors_model_path, num_threads=2)


def quantise(features: np.ndarray) -> np.ndarray:
    """uint8(255·f) as MATLAB rounds it (half away from zero, saturating), as float32."""
    return np.clip(np.floor(features * 255.0 + 0.5), 0, 255).astype(np.float32)


def colour_patches(rgb_u8: np.ndarray, positions: np.ndarray, n_scale1: int) -> np.ndarray:
    """Independent oracle of the 27×27 network patches (ALGORITHM.md §3).

    Scale 1: the 27×27 window of the image padded by replication. Scale 2: the
    15×15 window, padded to 27×27 by replicating its own border, i.e. the
    window offsets clamped to ±7.
    """
    radius = 13
    padded = np.pad(rgb_u8, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    offsets = np.arange(-radius, radius + 1)
    patches = np.empty((len(positions), 27, 27, 3), dtype=np.uint8)
    for part, offs in ((slice(0, n_scale1), offsets), (slice(n_scale1, None), np.clip(offsets, -7, 7))):
        rows = positions[part, 0, None, None] + radius + offs[None, :, None]
        cols = positions[part, 1, None, None] + radius + offs[None, None, :]
        patches[part] = padded[rows, cols]
    return patches


def golden_patches(golden) -> np.ndarray:
    feats = golden["features"]
    if "rgb_patches_u8" in feats:
        return feats["rgb_patches_u8"]
    return colour_patches(golden["edges"]["rgb_u8"], feats["pos"], int(feats["n_scale1"]))


def test_first_patches_match_golden_probabilities(golden, authors_model):
    """Exact network inputs of the authors' run (transposed blobs) → their probabilities."""
    cls = golden["classify"]
    # [n, c, x, y] blobs → natural [n, y, x, c] uint8 patches (values are integers).
    patches = cls["in_img_nchw_first256"].transpose(0, 3, 2, 1).astype(np.uint8)
    prob = authors_model.predict(cls["in_dct_first256"], cls["in_grd_first256"], cls["in_svd_first256"], patches)
    assert prob.dtype == np.float32 and prob.shape == (N_FIRST, 11)
    np.testing.assert_allclose(prob, cls["prob"][:N_FIRST], rtol=0, atol=1e-5)


def test_all_patches_labels_match_golden(golden, authors_model):
    feats, cls = golden["features"], golden["classify"]
    prob = authors_model.predict(
        quantise(feats["f_dct"]), quantise(feats["f_grd"]), quantise(feats["f_svd"]), golden_patches(golden)
    )
    # The authors' run fed its last partial batch unrounded: compare
    # probabilities only where the inputs are the same.
    n_rounded = int(cls["n_full_batch"])
    np.testing.assert_allclose(prob[:n_rounded], cls["prob"][:n_rounded], rtol=0, atol=1e-5)

    label = prob.argmax(axis=1)
    differ = np.flatnonzero(label != cls["label"])
    assert len(differ) <= 0.005 * len(label)
    # Every difference must be explained: an unrounded input of the authors'
    # run, or a near tie (top-2 gap under 1e-5) that summation order can flip.
    top2 = np.sort(cls["prob"], axis=1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] < 1e-5
    assert np.all((differ >= n_rounded) | near_tie[differ])


def test_transposed_layout_equals_baked_transpose(golden_0002, authors_model, caffemodel_path, tmp_path):
    """The authors' kernels as stored + layout "transposed" == converted model."""
    metadata = dataclasses.replace(authors_model.info, patch_layout="transposed")
    path = save_model(build_model(authors_weights(caffemodel_path), metadata), tmp_path / "t.onnx")
    transposed = DefocusModel.load(path, num_threads=2)
    feats = golden_0002["features"]
    args = [quantise(feats[k][:500]) for k in ("f_dct", "f_grd", "f_svd")]
    args.append(feats["rgb_patches_u8"][:500])
    np.testing.assert_allclose(transposed.predict(*args), authors_model.predict(*args), rtol=0, atol=1e-6)


def test_prediction_is_independent_of_batching(golden_0002, authors_model):
    feats = golden_0002["features"]
    n = 1000
    hand = [quantise(feats[k][:n]) for k in ("f_dct", "f_grd", "f_svd")]
    patches = feats["rgb_patches_u8"][:n]
    whole = authors_model.predict(*hand, patches, batch_size=4096)
    np.testing.assert_array_equal(authors_model.predict(*hand, patches, batch_size=128), whole)
    bounds = [0, 1, 300, 301, 777, n]
    batches = ((a, b, patches[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    np.testing.assert_array_equal(authors_model.predict(*hand, batches), whole)


def test_batches_must_cover_all_patches(golden_0002, authors_model):
    feats = golden_0002["features"]
    hand = [quantise(feats[k][:100]) for k in ("f_dct", "f_grd", "f_svd")]
    patches = feats["rgb_patches_u8"][:100]
    with pytest.raises(ValueError, match="cover"):
        authors_model.predict(*hand, [(0, 50, patches[:50]), (60, 100, patches[60:])])
    with pytest.raises(ValueError, match="cover"):
        authors_model.predict(*hand, [(0, 50, patches[:50])])
    with pytest.raises(ValueError, match="disagree"):
        authors_model.predict(*hand, patches[:99])


def test_pooling_rounds_up_like_caffe(authors_model_path):
    inferred = onnx.shape_inference.infer_shapes(onnx.load(authors_model_path)).graph.value_info
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in inferred}
    assert dims["conv1_relu"] == [25, 25, 25] and dims["conv1_pool"] == [25, 9, 9]
    assert dims["conv2_relu"] == [50, 7, 7] and dims["conv2_pool"] == [50, 3, 3]
    assert dims["deep"] == [25]


def test_metadata_round_trip(tmp_path, authors_model_path):
    model = DefocusModel.load(authors_model_path)
    copy = save_model(onnx.load(authors_model_path), tmp_path / "copy.onnx")
    reloaded = DefocusModel.load(copy)
    assert reloaded.metadata == model.metadata
    assert reloaded.info == model.info
    assert ModelMetadata.from_props(model.metadata) == model.info
    assert model.metadata["dhde.format_version"] == "1"
    assert model.metadata["dhde.input_quantisation"] == "uint8"


def _random_weights(rng, widths):
    """Weights of fc layers mapping widths[0] → ... → widths[-1]."""
    weights = {}
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        weights[f"fc{k}.weight"] = rng.normal(0, 0.1, (n_out, n_in)).astype(np.float32)
        weights[f"fc{k}.bias"] = rng.normal(0, 0.1, n_out).astype(np.float32)
    return weights


def test_feature_subset_model_matches_numpy(tmp_path):
    """An ablation model (f_D and f_S only, 5 classes): no patch input, same format."""
    rng = np.random.default_rng(0)
    weights = _random_weights(rng, [80, 16, 5])
    metadata = ModelMetadata(features=("svd", "dct"), sigma_labels=(1.0, 1.5, 2.0, 2.5, 3.0), source="test")
    model = DefocusModel.load(save_model(build_model(weights, metadata), tmp_path / "ablation.onnx"))
    assert not model.uses_patches and model.sigma_labels == (1.0, 1.5, 2.0, 2.5, 3.0)

    f_dct, f_svd = rng.integers(0, 256, (2, 10, 40)).astype(np.float32) / 16
    prob = model.predict(f_dct, None, f_svd)
    hidden = np.maximum(np.concatenate([f_svd, f_dct], axis=1) @ weights["fc1.weight"].T + weights["fc1.bias"], 0)
    logits = np.maximum(hidden @ weights["fc2.weight"].T + weights["fc2.bias"], 0)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(prob, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_build_model_rejects_ill_fitting_weights():
    rng = np.random.default_rng(0)
    metadata = ModelMetadata(features=("dct", "grd"))
    with pytest.raises(ModelError, match="its input has 80 entries"):
        build_model(_random_weights(rng, [120, 11]), metadata)
    with pytest.raises(ModelError, match="11 σ labels"):
        build_model(_random_weights(rng, [80, 7]), metadata)
    with pytest.raises(ModelError, match="weights lack 'conv1.weight'"):
        build_model(_random_weights(rng, [105, 11]), ModelMetadata(features=("dct", "deep")))
    with pytest.raises(ModelError, match=r"not used .*conv1.bias"):
        build_model({**_random_weights(rng, [80, 11]), "conv1.bias": np.zeros(25)}, metadata)
    with pytest.raises(ModelError, match="distinct names"):
        ModelMetadata(features=("dct", "colour"))


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelError, match="cannot read model"):
        DefocusModel.load(tmp_path / "absent.onnx")


@pytest.mark.parametrize("content", [b"", b"\x00\xff" * 100, b"hello, not a model"], ids=["empty", "binary", "text"])
def test_load_garbage_file(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not an ONNX model"):
        DefocusModel.load(path)


def _identity_onnx() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_load_foreign_onnx(tmp_path):
    path = tmp_path / "foreign.onnx"
    onnx.save(_identity_onnx(), path)
    with pytest.raises(ModelError, match="not a dhde model"):
        DefocusModel.load(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dhde.sigma_labels", None, "lacks 'dhde.sigma_labels'"),
        ("dhde.format_version", "2", "format version 2"),
        ("dhde.features", "[dct", "malformed metadata 'dhde.features'"),
        ("dhde.patch_layout", "diagonal", "unknown patch layout"),
    ],
)
def test_load_bad_metadata(tmp_path, authors_model_path, key, value, message):
    model = onnx.load(authors_model_path)
    props = {p.key: p.value for p in model.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = tmp_path / "edited.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match=message):
        DefocusModel.load(path)
