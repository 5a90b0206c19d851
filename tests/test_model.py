"""dhde's model format and runner: parity with the authors' network, round trips, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import dhde.model as model_module
from dhde.caffe import authors_weights
from dhde.errors import ModelError
from dhde.features import quantise_features
from dhde.model import DefocusModel, ModelMetadata, build_model, save_model
from dhde.patches import patch_scales

N_FIRST = 256


@pytest.fixture(scope="module")
def authors_model(authors_model_path):
    return DefocusModel.load(authors_model_path, num_threads=2)


def golden_inputs(golden) -> dict:
    """predict_image arguments for one golden image, from golden features and edges."""
    feats = golden["features"]
    n, n_scale1 = len(feats["pos"]), int(feats["n_scale1"])
    return dict(
        f_dct_q=quantise_features(feats["f_dct"]),
        f_grd_q=quantise_features(feats["f_grd"]),
        f_svd_q=quantise_features(feats["f_svd"]),
        rgb_u8=golden["edges"]["rgb_u8"],
        positions=feats["pos"],
        scales=patch_scales(n, n_scale1),
    )


def test_first_patches_match_golden_probabilities(golden, authors_model):
    """Exact network inputs of the authors' run (transposed blobs) → their probabilities."""
    cls = golden["classify"]
    # [n, c, x, y] blobs → natural [n, y, x, c] uint8 patches (values are integers).
    patches = cls["in_img_nchw_first256"].transpose(0, 3, 2, 1).astype(np.uint8)
    prob = authors_model.predict(cls["in_dct_first256"], cls["in_grd_first256"], cls["in_svd_first256"], patches)
    assert prob.dtype == np.float32 and prob.shape == (N_FIRST, 11)
    np.testing.assert_allclose(prob, cls["prob"][:N_FIRST], rtol=0, atol=1e-5)


def test_all_patches_labels_match_golden(golden, authors_model):
    """The production path (shared conv1, patches cut from the image) on every patch."""
    cls = golden["classify"]
    prob = authors_model.predict_image(**golden_inputs(golden))
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


def test_fast_path_equals_per_patch_network(golden, authors_model):
    """Conv1 + pool1 once per image (scale 1) and per mosaic (scale 2) == the whole network per patch."""
    inputs = golden_inputs(golden)
    shared = authors_model.predict_image(**inputs)
    per_patch = authors_model.predict_image(**inputs, fast=False)
    np.testing.assert_allclose(shared, per_patch, rtol=0, atol=1e-5)
    if "rgb_patches_u8" in golden["features"]:  # golden colour patches, 0002 only
        hand = [inputs[k] for k in ("f_dct_q", "f_grd_q", "f_svd_q")]
        from_golden_patches = authors_model.predict(*hand, golden["features"]["rgb_patches_u8"])
        np.testing.assert_array_equal(per_patch, from_golden_patches)


def test_scale2_mosaics_equal_per_patch_network(golden_0002, authors_model_path):
    """Scale-2 patches through mosaics of tiles: any count (partial mosaic rows,
    several mosaics, one patch), both patch layouts, same probabilities."""
    from dhde.pipeline import default_model_path

    inputs = golden_inputs(golden_0002)
    scale2 = np.flatnonzero(inputs["scales"] == 2)
    for path in (authors_model_path, default_model_path()):  # transposed and natural layout
        model = DefocusModel.load(path, num_threads=1)
        for count in (1, 17, 300):
            chosen = scale2[:: max(1, len(scale2) // count)][:count]
            subset = {k: (v[chosen] if k != "rgb_u8" else v) for k, v in inputs.items()}
            tiled = model.predict_image(**subset)
            np.testing.assert_allclose(tiled, model.predict_image(**subset, fast=False), rtol=0, atol=1e-5)
            assert np.allclose(tiled.sum(axis=1), 1.0, atol=1e-5)
    assert model.info.patch_layout == "natural"


def test_file_graph_equals_execution_graphs(golden_0002, authors_model_path, authors_model):
    """The graph as stored in the file, run as is, agrees with the runner's graphs."""
    import onnxruntime as ort

    inputs = golden_inputs(golden_0002)
    patches = golden_0002["features"]["rgb_patches_u8"]
    session = ort.InferenceSession(str(authors_model_path), providers=["CPUExecutionProvider"])
    feed = {"dct": inputs["f_dct_q"], "grd": inputs["f_grd_q"], "svd": inputs["f_svd_q"],
            "patch": patches.transpose(0, 3, 1, 2).astype(np.float32)}
    prob, logits = session.run(["prob", "logits_relu"], feed)
    np.testing.assert_allclose(authors_model.predict_image(**inputs), prob, rtol=0, atol=1e-5)
    # The second output, up to the authors' unrounded last batch (logits ~1e2).
    n_rounded = int(golden_0002["classify"]["n_full_batch"])
    np.testing.assert_allclose(logits[:n_rounded], golden_0002["classify"]["logits_relu"][:n_rounded], rtol=1e-5, atol=1e-4)


def test_image_bands_do_not_change_results(golden_0002, authors_model, monkeypatch):
    """Pool maps computed in many bands of rows == in one piece."""
    inputs = golden_inputs(golden_0002)
    monkeypatch.setattr(model_module, "_POOL_MAP_BYTES", 2**40)  # the whole image at once
    whole = authors_model.predict_image(**inputs)
    monkeypatch.setattr(model_module, "_POOL_MAP_BYTES", 0)  # the fewest rows per band: 27
    np.testing.assert_allclose(authors_model.predict_image(**inputs), whole, rtol=0, atol=1e-6)


def test_predict_image_checks_its_inputs(golden_0002, authors_model):
    inputs = golden_inputs(golden_0002)
    with pytest.raises(ValueError, match="uint8"):
        authors_model.predict_image(**{**inputs, "rgb_u8": inputs["rgb_u8"] / 255.0})
    outside = inputs["positions"].copy()
    outside[0] = (480, 0)
    with pytest.raises(ValueError, match="inside the image"):
        authors_model.predict_image(**{**inputs, "positions": outside})
    with pytest.raises(ValueError, match="disagree"):
        authors_model.predict_image(**{**inputs, "f_dct_q": inputs["f_dct_q"][:-1]})


def test_transposed_layout_equals_baked_transpose(golden_0002, authors_model, caffemodel_path, tmp_path):
    """The authors' kernels as stored + layout "transposed" == converted model."""
    metadata = dataclasses.replace(authors_model.info, patch_layout="transposed")
    path = save_model(build_model(authors_weights(caffemodel_path), metadata), tmp_path / "t.onnx")
    transposed = DefocusModel.load(path, num_threads=2)
    inputs = golden_inputs(golden_0002)
    hand = [inputs[k] for k in ("f_dct_q", "f_grd_q", "f_svd_q")]
    patches = golden_0002["features"]["rgb_patches_u8"]
    expected = authors_model.predict(*hand, patches)
    np.testing.assert_allclose(transposed.predict(*hand, patches), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(transposed.predict_image(**inputs), expected, rtol=0, atol=1e-5)


def test_prediction_is_independent_of_batching(golden_0002, authors_model):
    feats = golden_0002["features"]
    n = 1000
    hand = [quantise_features(feats[k][:n]) for k in ("f_dct", "f_grd", "f_svd")]
    patches = feats["rgb_patches_u8"][:n]
    whole = authors_model.predict(*hand, patches, batch_size=4096)
    np.testing.assert_array_equal(authors_model.predict(*hand, patches, batch_size=128), whole)
    bounds = [0, 1, 300, 301, 777, n]
    batches = ((a, b, patches[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    np.testing.assert_array_equal(authors_model.predict(*hand, batches), whole)


def test_batches_must_cover_all_patches(golden_0002, authors_model):
    feats = golden_0002["features"]
    hand = [quantise_features(feats[k][:100]) for k in ("f_dct", "f_grd", "f_svd")]
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


@pytest.mark.parametrize("conv_side", [25, 26, 27])  # last pool window 1, 2 and 3 wide
def test_window_max_maps_gather_caffe_pool1(conv_side):
    """Stacked window maxima + gather index == Caffe's ceil-mode 3/3 max pool of each patch's conv1 window."""
    from dhde.model import _POOL_SIZE, _pool1_index, _window_max_maps

    rng = np.random.default_rng(conv_side)
    conv1_map = rng.standard_normal((conv_side + 11, conv_side + 7, 4)).astype(np.float32)
    pool_side = -(-conv_side // _POOL_SIZE)
    last = conv_side - _POOL_SIZE * (pool_side - 1)
    flat_maps, layout = _window_max_maps(conv1_map, last)
    tops = rng.integers(0, conv1_map.shape[0] - conv_side + 1, 40)
    lefts = rng.integers(0, conv1_map.shape[1] - conv_side + 1, 40)
    index = _pool1_index(tops, lefts, layout, pool_side, last)
    assert index.shape == (40, pool_side**2) and index.min() >= 0 and index.max() < len(flat_maps)
    gathered = flat_maps[index].reshape(40, pool_side, pool_side, -1)
    for k, (y, x) in enumerate(zip(tops, lefts)):
        window = conv1_map[y : y + conv_side, x : x + conv_side]
        for i in range(pool_side):
            for j in range(pool_side):
                cell = window[3 * i : 3 * i + 3, 3 * j : 3 * j + 3]  # slicing clips the partial windows
                np.testing.assert_array_equal(gathered[k, i, j], cell.max(axis=(0, 1)))
