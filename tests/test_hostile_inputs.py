"""Hostile and odd inputs: each gives a clear one-line error or a correct, finite result."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data as skdata

from dhde.errors import DHDEError, ImageLoadError, ImageTooSmallError
from dhde.io import load_image, load_pixels, max_image_pixels, to_uint8
from dhde.pipeline import DefocusEstimator, NoEdgesWarning


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()  # uint8 (512, 512, 3)


@pytest.fixture(scope="module")
def estimator():
    with DefocusEstimator(None) as est:  # the packaged model: no shared data needed
        yield est


def _one_line_error(path, match: str) -> str:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, keep", [("JPEG", 5000), ("PNG", 3000), ("PNG", 40)])
def test_truncated_files(tmp_path, astronaut, fmt, keep):
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(_encoded(astronaut, fmt)[:keep])
    _one_line_error(path, "cannot read image|not a recognised image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_corrupted_files(tmp_path, astronaut, fmt):
    data = bytearray(_encoded(astronaut, fmt))
    rng = np.random.default_rng(0)
    positions = rng.integers(200, len(data), 300)
    data_values = rng.integers(0, 256, 300)
    for position, value in zip(positions, data_values):
        data[position] = value
    path = tmp_path / f"c.{fmt.lower()}"
    path.write_bytes(bytes(data))
    _one_line_error(path, "cannot read image")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.png", b"hello, not pixels", "not a recognised image"),
        ("document.jpg", b"%PDF-1.4\n" + b"x" * 200, "not a recognised image"),
        ("random.tif", bytes(range(256)) * 4, "cannot read"),
    ],
)
def test_non_images_with_image_extensions(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    _one_line_error(path, match)


def test_wrong_extension_is_read_by_content(tmp_path, astronaut):
    path = tmp_path / "actually_a_png.jpg"
    path.write_bytes(_encoded(astronaut, "PNG"))
    np.testing.assert_array_equal(to_uint8(load_image(path)), astronaut)


def _save_pillow(image: np.ndarray, mode: str, **kwargs):
    def save(path):
        Image.fromarray(image).convert(mode).save(path, **kwargs)

    return save


@pytest.mark.parametrize(
    "name, mode",
    [
        ("gray.jpg", "L"),
        ("palette.png", "P"),
        ("palette.gif", "P"),
        ("palette.tif", "P"),
        ("cmyk.jpg", "CMYK"),
        ("cmyk.tif", "CMYK"),
        ("rgba.png", "RGBA"),
        ("gray_alpha.png", "LA"),
        ("bilevel.tif", "1"),
    ],
)
def test_colour_modes_give_the_right_colours(tmp_path, astronaut, name, mode):
    path = tmp_path / name
    Image.fromarray(astronaut).convert(mode).save(path)
    rgb = load_image(path)
    assert rgb.shape == astronaut.shape and rgb.dtype == np.float64 and np.isfinite(rgb).all()
    # The colours the file shows (Pillow's conversion of what was saved), not
    # raw palette indices, inverted CMYK channels or a dropped gray channel.
    with Image.open(path) as shown:
        expected = np.asarray(shown.convert("RGB"))
    np.testing.assert_array_equal(to_uint8(rgb), expected)
    if mode == "CMYK":
        assert np.abs(to_uint8(rgb).astype(int) - astronaut).mean() < 8


def test_tiff_variants(tmp_path, astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    # Min-is-white: stored inverted, read the right way round.
    tifffile.imwrite(tmp_path / "white.tif", 255 - gray, photometric="miniswhite")
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "white.tif"))[..., 0], gray)
    # JPEG-compressed (tifffile needs the optional imagecodecs; Pillow reads it).
    Image.fromarray(astronaut).save(tmp_path / "jpeg.tif", compression="jpeg")
    assert np.abs(to_uint8(load_image(tmp_path / "jpeg.tif")).astype(int) - astronaut).mean() < 4
    # Multi-page: the first page.
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([astronaut, astronaut[::-1]]))
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "pages.tif")), astronaut)
    # Planar storage and 16-bit gray with an alpha sample.
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(astronaut, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "planar.tif")), astronaut)
    gray_alpha = np.dstack([gray, np.full_like(gray, 255)]).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "ga16.tif", gray_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    np.testing.assert_allclose(load_image(tmp_path / "ga16.tif")[..., 1], gray / 255.0)
    # 32-bit integer samples beyond 16 bits: a clear error.
    tifffile.imwrite(tmp_path / "int32.tif", gray.astype(np.int32) * 1000)
    _one_line_error(tmp_path / "int32.tif", "out of range")


def test_sixteen_bit_netpbm_and_png(tmp_path, astronaut):
    gray16 = np.asarray(Image.fromarray(astronaut).convert("L")).astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "g16.pgm"), gray16)  # Pillow opens it in mode "I"
    pixels = load_pixels(tmp_path / "g16.pgm")
    assert pixels.dtype == np.uint16
    np.testing.assert_allclose(load_image(tmp_path / "g16.pgm")[..., 0], gray16 / 65535.0)
    colour16 = astronaut.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "c16.png"), colour16[..., ::-1])
    assert load_pixels(tmp_path / "c16.png").dtype == np.uint16


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header (8-bit gray) claims ``width``×``height``; its pixel data is one row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_decompression_bomb_guard(tmp_path):
    # The size is refused from the header, before any pixel is decoded.
    (tmp_path / "bomb.png").write_bytes(_png_claiming(10000, 10000))
    message = _one_line_error(tmp_path / "bomb.png", "image too large")
    assert "100,000,000 pixels" in message and f"{max_image_pixels():,}" in message
    # TIFF goes through tifffile: the same limit, checked before reading (a
    # sparse 120 MP file takes no disk space).
    tifffile.imwrite(tmp_path / "bomb.tif", shape=(12000, 10000), dtype=np.uint8)
    assert "120,000,000 pixels" in _one_line_error(tmp_path / "bomb.tif", "image too large")


def test_a_48_megapixel_photo_is_not_refused(tmp_path):
    assert max_image_pixels() >= 48_000_000
    Image.new("L", (8000, 6000), 90).save(tmp_path / "48mp.png")
    pixels = load_pixels(tmp_path / "48mp.png")  # uint8, 48 MB (float64 RGB would be 1.2 GB)
    assert pixels.shape == (6000, 8000) and pixels.dtype == np.uint8


def test_paths_with_spaces_and_non_ascii_names(tmp_path, astronaut):
    folder = tmp_path / "my photos ünïcode 写真"
    folder.mkdir()
    for name in ("holiday photo é.jpg", "日本語.png", "16 bit é.png"):
        path = folder / name
        if name.startswith("16"):
            # OpenCV's imwrite cannot open non-ASCII paths on every OS: encode in memory.
            path.write_bytes(cv2.imencode(".png", astronaut.astype(np.uint16)[..., ::-1] * 257)[1].tobytes())
        else:
            Image.fromarray(astronaut).save(path, quality=95)
        assert load_image(path).shape == astronaut.shape


# --------------------------------------------------------------------------
# Through the estimator
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (26, 300, 3), (300, 26)])
def test_images_smaller_than_a_patch(estimator, shape):
    with pytest.raises(ImageTooSmallError, match="at least 27×27") as info:
        estimator(np.zeros(shape, dtype=np.uint8))
    assert "\n" not in str(info.value)


def test_one_pixel_file_and_smallest_image(estimator, tmp_path, astronaut):
    Image.fromarray(astronaut[:1, :1]).save(tmp_path / "one.png")
    with pytest.raises(ImageTooSmallError):
        estimator(tmp_path / "one.png")
    result = estimator(astronaut[200:227, 200:227])  # exactly one 27×27 patch
    assert result.defocus.shape == (27, 27) and np.isfinite(result.defocus).all()


def test_flat_large_image_gives_uniform_map_at_input_size(estimator):
    # Downscaled to the working size first: the downscale must not invent
    # edges from rounding, and σ is reported in input pixels.
    flat = np.full((1300, 700, 3), 0.37, dtype=np.float32)
    with pytest.warns(NoEdgesWarning):
        result = estimator(flat)
    assert result.working_scale == pytest.approx(estimator.config.working_long_side / 1300)
    assert result.defocus.shape == (1300, 700) and not result.mask.any()
    assert np.all(result.defocus == min(estimator.model.sigma_labels) / result.working_scale)


def test_estimate_from_a_non_ascii_path(estimator, tmp_path):
    path = tmp_path / "café photo 日本.jpg"
    Image.fromarray(skdata.chelsea()[::2, ::2]).save(path, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = estimator(path)
    assert result.defocus.shape == (150, 226) and np.isfinite(result.defocus).all()


def test_failed_propagation_is_an_error_not_a_nan_map(estimator, monkeypatch):
    # The multigrid preconditioner once broke down on ill-conditioned working
    # images (CUHK out_of_focus0007 and 0067 upscaled 4× and downscaled to
    # 640 px: an indefinite coarse matrix, NaN everywhere; matting now
    # guards against that itself). Whatever breaks a solve, the pipeline
    # must report it, not return NaN.
    from dhde import matting

    original = matting.propagation_solver

    def breaking_solver(*args, **kwargs):
        solve = original(*args, **kwargs)
        return lambda values, tol=5e-4: np.full_like(solve(values, tol), np.nan)

    monkeypatch.setattr(matting, "propagation_solver", breaking_solver)
    with pytest.raises(DHDEError, match="propagation solve failed") as info:
        estimator(skdata.chelsea()[::2, ::2])
    assert "\n" not in str(info.value)
