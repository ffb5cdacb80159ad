"""Open images the way training needs them: RGB, EXIF orientation applied, never outside the image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config import DataConfig
from .coco import DatasetError, ImageRecord, Problem, is_safe_relative

# Pillow's own bomb guard would raise a DecompressionBombError with no file context; we check
# pixel counts ourselves against the configured limit instead.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = DataConfig.max_image_pixels
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# path -> ((mtime_ns, size), signature): check_image fills it while it has the image open, so the
# duplicate checks of the split (data/split.py, data/training_data.py) need not decode every image again.
_SIGNATURES: dict[str, tuple[tuple[int, int], np.ndarray]] = {}


class ImageLoadError(DatasetError):
    """An image file that is missing, unreadable or unsafe to open."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in a folder, sorted by name; FileNotFoundError naming the folder when none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def image_path(image_dir: str | Path, file_name: str) -> Path:
    """The file inside image_dir; refuses absolute names and '..' so a hostile file_name reads nothing outside.

    The check is lexical on purpose: symlinks inside the folder are followed (symlink farms, DVC or
    git-annex checkouts, data on another disk), since whoever owns the folder put them there.
    """
    if not is_safe_relative(file_name):
        raise ImageLoadError(f"{file_name}: refused, the name leaves the image folder {image_dir}")
    return Path(image_dir) / file_name


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any common image as 8-bit RGB with EXIF orientation applied; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ImageLoadError(f"{path}: {image.width}x{image.height} is over the limit of {max_pixels}"
                                     " pixels (data.max_image_pixels); downscale it first")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageLoadError(f"{path}: cannot read the image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = max(float(array.max()), 1.0)
        scale = 255.0 / (65535.0 if top > 255 else 255.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def thumbnail_signature(image: Image.Image, size: int = 16) -> np.ndarray:
    """A zero-mean, unit-length 16x16 grayscale thumbnail: near copies (re-encoded, resized) correlate ~1.

    Contrast is normalised away, so dark micrographs with a few bright cells compare by where the cells
    are, not by their shared black background. A flat image gets all zeros and matches nothing.
    """
    small = np.asarray(image.convert("L").resize((size, size), Image.BOX), dtype=np.float64).flatten()
    small -= small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 1e-6 * size else np.zeros_like(small)


def image_signature(image_dir: str | Path, file_name: str, image: Image.Image | None = None) -> np.ndarray:
    """The thumbnail signature of an image file, computed once per version of the file."""
    path = image_path(image_dir, file_name)
    stat = path.stat()
    stamp, key = (stat.st_mtime_ns, stat.st_size), str(path.resolve())
    cached = _SIGNATURES.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    signature = thumbnail_signature(image if image is not None else load_rgb(path))
    _SIGNATURES[key] = (stamp, signature)
    return signature


def check_image(image_dir: str | Path, record: ImageRecord, json_name: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Problem | None:
    """Open one image fully and compare its size with the JSON; a Problem or None."""
    entry = f"images id={record.image_id} file_name={record.file_name}"
    try:
        image = load_rgb(image_path(image_dir, record.file_name), max_pixels)
    except ImageLoadError as error:
        return Problem(json_name, entry, str(error))
    if image.size != (record.width, record.height):
        return Problem(json_name, entry, f"image on disk is {image.width}x{image.height} (after EXIF rotation),"
                       f" the JSON says {record.width}x{record.height}")
    image_signature(image_dir, record.file_name, image)
    return None


def check_images(image_dir: str | Path, records: list[ImageRecord], json_name: str,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4) -> list[Problem]:
    from concurrent.futures import ThreadPoolExecutor

    # Pillow releases the GIL while decoding, so threads make this check close to I/O bound.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda r: check_image(image_dir, r, json_name, max_pixels), records)
        return [p for p in found if p is not None]
