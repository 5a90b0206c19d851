"""Image loading: formats, modes, orientation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from dhde.errors import ImageLoadError
from dhde.io import array_to_rgb, load_image, save_float_tiff, save_mask_png, to_uint8


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()  # uint8 (512, 512, 3)


def test_jpeg_decodes_like_golden(golden):
    rgb = load_image(golden.image_path)
    assert rgb.dtype == np.float64 and rgb.shape == golden["edges"]["rgb_u8"].shape
    np.testing.assert_array_equal(to_uint8(rgb), golden["edges"]["rgb_u8"])


def test_png_roundtrip_and_modes(tmp_path, astronaut):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    np.testing.assert_array_equal(to_uint8(load_image(path)), astronaut)
    # Grayscale → three equal channels; RGBA → alpha dropped; palette → RGB.
    Image.fromarray(astronaut).convert("L").save(tmp_path / "g.png")
    gray = load_image(tmp_path / "g.png")
    assert gray.shape == astronaut.shape and np.array_equal(gray[..., 0], gray[..., 2])
    Image.fromarray(astronaut).convert("RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "rgba.png")), astronaut)
    Image.fromarray(astronaut).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == astronaut.shape
    Image.fromarray(astronaut).convert("CMYK").save(tmp_path / "c.jpg")
    assert np.abs(to_uint8(load_image(tmp_path / "c.jpg")).astype(int) - astronaut).mean() < 8


def test_sixteen_bit_inputs(tmp_path):
    import cv2
    import tifffile

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(30, 40, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])
    np.testing.assert_allclose(load_image(tmp_path / "c16.png"), rgb16 / 65535.0)
    gray16 = rgb16[..., 0]
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    np.testing.assert_allclose(load_image(tmp_path / "g16.png")[..., 1], gray16 / 65535.0)
    tifffile.imwrite(tmp_path / "c16.tif", rgb16)
    np.testing.assert_allclose(load_image(tmp_path / "c16.tif"), rgb16 / 65535.0)


def test_exif_orientation_is_applied(tmp_path, astronaut):
    img = Image.fromarray(astronaut[:200, :300])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "o.jpg").shape == (300, 200, 3)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"", "empty file"), (b"not an image at all", "not a recognised image")],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path, astronaut):
    path = tmp_path / "t.jpg"
    Image.fromarray(astronaut).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(path)


def test_array_inputs():
    np.testing.assert_array_equal(array_to_rgb(np.full((4, 5), 255, np.uint8)), np.ones((4, 5, 3)))
    np.testing.assert_allclose(array_to_rgb(np.full((4, 5, 1), 65535, np.uint16)), np.ones((4, 5, 3)))
    np.testing.assert_array_equal(array_to_rgb(np.full((4, 5, 3), 2.0)), np.ones((4, 5, 3)))
    with pytest.raises(ImageLoadError, match="NaN"):
        array_to_rgb(np.full((4, 5, 3), np.nan))
    with pytest.raises(ImageLoadError, match="shape"):
        array_to_rgb(np.zeros((4, 5, 2)))


def test_writers(tmp_path):
    import tifffile

    sigma = np.linspace(0.5, 2.0, 12).reshape(3, 4)
    save_float_tiff(tmp_path / "s.tif", sigma)
    back = tifffile.imread(tmp_path / "s.tif")
    assert back.dtype == np.float32 and np.allclose(back, sigma, atol=1e-7)
    save_mask_png(tmp_path / "m.png", sigma > 1.0)
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == (sigma > 1.0).sum()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_colormapped_png_maps_sigma_to_colours(tmp_path):
    from dhde.io import colormap_lut, save_colormapped_png

    sigma = np.tile(np.linspace(0.5, 2.0, 200), (120, 1))
    sigma[0, 0] = np.nan  # drawn as vmin, never a crash
    save_colormapped_png(tmp_path / "c.png", sigma, 0.5, 2.0)
    rendered = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    lut = colormap_lut("magma")
    assert rendered.shape[0] == 120 and rendered.shape[1] > 200 + 20  # map + colour bar
    np.testing.assert_array_equal(rendered[5, 0], lut[0])
    np.testing.assert_array_equal(rendered[5, 199], lut[255])
    np.testing.assert_array_equal(rendered[0, 0], lut[0])
    # Values outside [vmin, vmax] saturate.
    save_colormapped_png(tmp_path / "d.png", np.full((60, 80), 9.0), 0.5, 2.0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))[30, 40], lut[255])
