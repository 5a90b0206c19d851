"""Reading photos and writing result maps.

Images enter the pipeline as float64 RGB in [0, 1], shape (H, W, 3), with the
EXIF orientation applied (a phone photo is processed the way it is viewed).

Loading has two steps: :func:`load_pixels` decodes a file to its stored
values in a small set of dtypes (uint8, uint16, float32, float64), and
:func:`pixels_to_rgb` normalises them to [0, 1]. The split lets a
high-resolution photo be downscaled in its 1-byte-per-channel form (see
:mod:`dhde.resolution`) instead of first expanding to float64 (a 24 MP photo
is 72 MB as uint8 and 576 MB as float64 RGB).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]

_TIFF_SUFFIXES = {".tif", ".tiff"}

#: dtypes of the arrays returned by :func:`load_pixels` and :func:`canonical_pixels`.
PIXEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32), np.dtype(np.float64))


def max_image_pixels() -> int:
    """Largest pixel count (width × height) a file may have, read at call time.

    This is Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``
    (89,478,485 by default: a 48 MP photo passes, a 100 MP one does not); set
    it to allow larger photos. dhde treats Pillow's warning above the limit as
    an error and applies the same limit to TIFF files read with tifffile.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else np.iinfo(np.int64).max


def _too_large(path: Path, pixels: int | None) -> ImageLoadError:
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return ImageLoadError(
        f"image too large: {count}, more than the {max_image_pixels():,} allowed "
        f"(decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS to allow it): {path}"
    )


def _pil_to_pixels(img: Image.Image) -> np.ndarray:
    """Any Pillow image → (H, W) or (H, W, 3) array of a :data:`PIXEL_DTYPES` dtype."""
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)  # also makes big-endian "I;16B" native
    if mode in ("I", "F"):
        # 32-bit integer (e.g. 16-bit PGM files) or float: the array rules apply.
        return canonical_pixels(np.asarray(img))
    if mode == "1":
        img = img.convert("L")
    elif mode not in ("RGB", "L"):
        # Palette, CMYK, YCbCr, LAB, HSV, LA, RGBA, ...: Pillow's own conversion
        # is the colour-managed-free standard; alpha is dropped, not composited,
        # so transparent pixels keep their colour.
        img = img.convert("RGB")
    return np.asarray(img)


def canonical_pixels(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image and bring it to a :data:`PIXEL_DTYPES` dtype.

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays (alpha dropped).
    Returns (H, W) for one channel, else (H, W, 3); values are not rescaled:
    bool becomes uint8 0/255, other integer types become uint8 if every value
    fits in 0..255, else uint16 (values outside 0..65535 are an error), float16
    becomes float32. Non-finite floats are an error. uint8/uint16/float inputs
    of the right shape are returned without a copy.
    """
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageLoadError(f"unsupported image array shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.ndim == 3:
        arr = arr[..., :3]
    if arr.size == 0:
        raise ImageLoadError(f"empty image array of shape {array.shape}")
    if arr.dtype in PIXEL_DTYPES:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ImageLoadError("image array contains NaN or infinite values")
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.integer):
        # Other integer types: taken as 8-bit if every value fits, else 16-bit.
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 65535:
            raise ImageLoadError(f"integer image values out of range for dtype {arr.dtype} ({low}..{high}; 0..65535 allowed)")
        return arr.astype(np.uint8 if high <= 255 else np.uint16)
    if np.issubdtype(arr.dtype, np.floating):
        return canonical_pixels(arr.astype(np.float32 if arr.dtype.itemsize < 4 else np.float64))
    raise ImageLoadError(f"unsupported image dtype {arr.dtype}")


def unit_range(pixels: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Values of a :data:`PIXEL_DTYPES` array in [0, 1], same shape, as ``dtype``.

    uint8 ÷ 255, uint16 ÷ 65535; floats are taken as [0, 1] and clipped.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(dtype) / dtype(255.0)
    if pixels.dtype == np.uint16:
        return pixels.astype(dtype) / dtype(65535.0)
    if pixels.dtype.kind == "f":
        return np.clip(pixels.astype(dtype), 0.0, 1.0)
    raise ImageLoadError(f"unsupported pixel dtype {pixels.dtype} (use canonical_pixels first)")


def pixels_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """A :data:`PIXEL_DTYPES` (H, W) or (H, W, 3) array → float64 RGB in [0, 1], (H, W, 3)."""
    rgb = unit_range(pixels, np.float64)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return rgb


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Normalise an in-memory image to float64 RGB in [0, 1], shape (H, W, 3).

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays (alpha dropped) of
    dtype uint8 (÷255), uint16 (÷65535), bool, other integers (see
    :func:`canonical_pixels`) or float (taken as [0, 1] and clipped).
    Non-finite values are an error.
    """
    return pixels_to_rgb(canonical_pixels(array))


def _load_tiff(path: Path) -> np.ndarray:
    """TIFF through tifffile (16-bit and float samples keep their precision).

    tifffile returns stored samples as they are, which is right for gray
    (min-is-black) and RGB images only; palette, min-is-white, CMYK, YCbCr and
    CIELAB files, and compressions tifffile cannot decode without the optional
    ``imagecodecs`` package (JPEG, ...), go through Pillow, which converts
    them. Only the first page of a multi-page file is read.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if page.imagewidth * page.imagelength > max_image_pixels():
                raise _too_large(path, page.imagewidth * page.imagelength)
            if page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
                try:
                    arr = page.asarray()
                except ValueError:  # e.g. "<COMPRESSION.JPEG> requires the 'imagecodecs' package"
                    arr = None
                if arr is not None:
                    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3:
                        arr = np.moveaxis(arr, 0, 2)  # planar (C, H, W) storage
                    if page.photometric == tifffile.PHOTOMETRIC.MINISBLACK and arr.ndim == 3:
                        arr = arr[..., 0]  # gray + extra samples (alpha)
                    return canonical_pixels(arr)
    except ImageLoadError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageLoadError(f"cannot read TIFF {path}: {exc}".splitlines()[0]) from exc
    return _load_with_pillow(path)


def load_pixels(source: ImageSource) -> np.ndarray:
    """Decode a photo to its stored values, before normalisation.

    Returns (H, W) (gray) or (H, W, 3) (colour), dtype uint8, uint16, float32
    or float64 (see :data:`PIXEL_DTYPES`; :func:`pixels_to_rgb` maps it to
    [0, 1]). Everything else is as :func:`load_image`. Numpy arrays are
    validated (:func:`canonical_pixels`) and returned without a copy when
    already in this form.
    """
    if isinstance(source, np.ndarray):
        return canonical_pixels(source)
    if isinstance(source, Image.Image):
        return _pil_to_pixels(ImageOps.exif_transpose(source))
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(f"no such file: {path}")
    if path.is_dir():
        raise ImageLoadError(f"is a directory, not an image: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"empty file: {path}")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            return _load_tiff(path)
        return _load_with_pillow(path)
    except ImageLoadError as exc:
        if str(path) in str(exc):
            raise
        # An array rule (canonical_pixels) refused the decoded samples: say which file.
        raise ImageLoadError(f"{exc}: {path}") from exc


def load_image(source: ImageSource) -> np.ndarray:
    """Load a photo as float64 RGB in [0, 1], shape (H, W, 3).

    ``source`` is a path (any format Pillow reads; TIFF through tifffile, so
    16-bit and float TIFFs keep their precision), a Pillow image, or a numpy
    array (see :func:`array_to_rgb`). The EXIF orientation tag is applied.
    Grayscale inputs are replicated to three channels; alpha is dropped;
    16-bit inputs are scaled by 1/65535.

    Raises :class:`~dhde.errors.ImageLoadError` with a one-line message for a
    missing, unreadable, truncated, unsupported or too large file (more than
    :func:`max_image_pixels` pixels).
    """
    return pixels_to_rgb(load_pixels(source))


def _load_with_pillow(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if _is_16bit_colour_png(img):
                    return _load_16bit_colour_png(path)
                img.load()
                return _pil_to_pixels(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's message is "Image size (N pixels) exceeds limit of ...".
        count = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(count.group(1)) if count else None) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not a recognised image file: {path}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageLoadError(f"cannot read image {path}: {reason}") from exc


def _is_16bit_colour_png(img: Image.Image) -> bool:
    # Pillow decodes 16-bit-per-channel colour PNGs to 8 bits (raw mode
    # "RGB;16B"); OpenCV keeps all 16, so such files go through OpenCV.
    return img.format == "PNG" and any(str(t.args).endswith(";16B") for t in img.tile) and img.mode in ("RGB", "RGBA")


def _load_16bit_colour_png(path: Path) -> np.ndarray:
    import cv2

    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile: non-ASCII paths work
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageLoadError(f"cannot read image {path}: OpenCV could not decode it")
    arr = arr[..., [2, 1, 0]] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
    return canonical_pixels(arr)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """float [0, 1] → uint8 with MATLAB's rounding (half away from zero).

    For 8-bit sources this returns the decoded bytes exactly.
    """
    scaled = np.clip(rgb, 0.0, 1.0) * 255.0
    return np.floor(scaled + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> Path:
    """Write through a temporary file in the same folder, then rename.

    An interrupted run never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_float_tiff(path: Path, array: np.ndarray) -> Path:
    """Save a (H, W) map as a float32 TIFF (values unchanged, e.g. σ in pixels)."""
    import tifffile

    data = np.ascontiguousarray(array, dtype=np.float32)
    return _atomic_write(path, lambda p: tifffile.imwrite(p, data, photometric="minisblack"))


def save_png(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 (H, W) or (H, W, 3) array as PNG."""
    img = Image.fromarray(np.ascontiguousarray(array))
    return _atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_mask_png(path: Path, mask: np.ndarray) -> Path:
    """Save a boolean blur mask as PNG, 255 = blurred (the CUHK convention)."""
    return save_png(path, np.where(mask, 255, 0).astype(np.uint8))


def colormap_lut(name: str = "magma") -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colour map."""
    from matplotlib import colormaps  # the colour map data only, not pyplot

    return np.round(colormaps[name](np.arange(256))[:, :3] * 255.0).astype(np.uint8)


def render_colormapped(
    sigma_map: np.ndarray,
    vmin: float,
    vmax: float,
    cmap: str = "magma",
    label: str = "defocus sigma (px)",
    ticks: int = 3,
) -> np.ndarray:
    """Colour-map a (H, W) σ map and add a colour bar with labelled ticks.

    Returns a (H, W + bar, 3) uint8 image: the map at native resolution (one
    map pixel per image pixel), colours fixed by ``vmin``/``vmax`` so maps of
    different photos compare, and on its right a vertical colour bar (high σ at
    the top) with ``ticks`` + 1 values and ``label`` (ASCII: Pillow's
    bundled font has no Greek letters).

    Drawn with Pillow from matplotlib's colour-map table: a matplotlib figure
    costs ~1.3 s on a cold start and ~0.25 s per image here, this ~0.05 s
    (~0.7 s for a 24 MP map).
    """
    from PIL import ImageDraw, ImageFont

    import cv2

    lut = colormap_lut(cmap)
    h, w = sigma_map.shape
    # Colour index in float32, in place (a 24 MP map: 0.4 s instead of 1.6 s
    # for float64 temporaries); NaN maps to vmin, ±inf saturate.
    index = sigma_map.astype(np.float32)
    index -= np.float32(vmin)
    index *= np.float32(255.0 / max(vmax - vmin, 1e-12))
    index += np.float32(0.5)
    np.clip(index, 0.0, 255.0, out=index)
    index = np.nan_to_num(index, copy=False, nan=0.0).astype(np.uint8)
    font_size = int(np.clip(h / 32, 10, 40))
    font = ImageFont.load_default(size=font_size)
    bar_w = max(8, font_size)
    margin = font_size
    text_w = int(font.getlength(f"{vmax:.2f}")) + margin // 2
    label_w = font_size + margin // 2
    total_bar = margin + bar_w + margin // 2 + text_w + label_w
    canvas = Image.new("RGB", (w + total_bar, h), (255, 255, 255))
    # cv2.LUT: 0.1 s for 24 MP, numpy's lut[index] 0.5 s.
    canvas.paste(Image.fromarray(cv2.LUT(cv2.merge([index] * 3), lut[:, None, :])), (0, 0))

    top, bottom = margin, h - margin
    if bottom - top >= 8:
        ramp = np.linspace(255, 0, bottom - top).round().astype(np.uint8)  # top = vmax
        strip = np.repeat(lut[ramp][:, None, :], bar_w, axis=1)
        x0 = w + margin
        canvas.paste(Image.fromarray(strip), (x0, top))
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((x0 - 1, top - 1, x0 + bar_w, bottom), outline=(0, 0, 0))
        for k in range(ticks + 1):
            value = vmin + (vmax - vmin) * k / ticks
            y = bottom - 1 - (bottom - top - 1) * k / ticks
            draw.line((x0 + bar_w, y, x0 + bar_w + margin // 4, y), fill=(0, 0, 0))
            draw.text((x0 + bar_w + margin // 2, y), f"{value:.2f}", fill=(0, 0, 0), font=font, anchor="lm")
        # Axis label, written vertically along the right edge.
        text = Image.new("RGBA", (int(font.getlength(label)) + 4, font_size + 6), (255, 255, 255, 0))
        ImageDraw.Draw(text).text((2, 2), label, fill=(0, 0, 0), font=font)
        text = text.rotate(90, expand=True)
        canvas.paste(text, (w + total_bar - label_w, max(0, (h - text.height) // 2)), text)
    return np.asarray(canvas)


def save_colormapped_png(
    path: Path,
    sigma_map: np.ndarray,
    vmin: float,
    vmax: float,
    cmap: str = "magma",
    label: str = "defocus sigma (px)",
) -> Path:
    """Save a σ map colour-mapped, with a colour bar in σ units, as PNG.

    See :func:`render_colormapped`.
    """
    return save_png(path, render_colormapped(sigma_map, vmin, vmax, cmap, label))
