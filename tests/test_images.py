"""Image files as users have them: odd modes, EXIF rotation, broken files, unsafe names."""

import io

import numpy as np
import pytest
from PIL import Image

from tinyseg.data.images import ImageLoadError, image_path, load_rgb


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = _save(tmp_path / f"x{suffix}", Image.new(mode, (7, 5)))
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (7, 5)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (6, 4))
    image.putpalette([255, 0, 0] * 256)
    image.info["transparency"] = 0
    loaded = load_rgb(_save(tmp_path / "p.png", image, transparency=0))
    assert loaded.mode == "RGB" and loaded.size == (6, 4)


def test_16_bit_png_scales_to_8_bit(tmp_path):
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 0
    loaded = np.asarray(load_rgb(_save(tmp_path / "deep.png", Image.fromarray(array))))
    assert loaded[1, 1, 0] == 255 and loaded[0, 0, 0] == 0


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_rgb(path).size == (10, 30)


def test_broken_files_raise_clear_errors(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, message in [("truncated.jpg", "cannot read"), ("empty.jpg", "empty"), ("text.jpg", "cannot read"),
                          ("missing.jpg", "not found")]:
        with pytest.raises(ImageLoadError, match=message) as error:
            load_rgb(tmp_path / name)
        assert name in str(error.value)


def test_huge_image_refused_with_limit(tmp_path):
    path = _save(tmp_path / "big.png", Image.new("L", (300, 300)))
    with pytest.raises(ImageLoadError, match="over the limit of 10000 pixels"):
        load_rgb(path, max_pixels=10_000)


def test_names_leaving_the_folder_are_refused(tmp_path):
    (tmp_path / "inside").mkdir()
    for name in ("../secret.png", "/etc/passwd", "a/../../b.png"):
        with pytest.raises(ImageLoadError, match="refused"):
            image_path(tmp_path / "inside", name)
    assert image_path(tmp_path / "inside", "sub/ok.png") == tmp_path / "inside" / "sub" / "ok.png"


def test_symlinked_images_are_followed_but_names_stay_inside(tmp_path):
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    _save(elsewhere / "real.png", Image.new("RGB", (8, 6)))
    farm = tmp_path / "farm"
    farm.mkdir()
    (farm / "a.png").symlink_to(elsewhere / "real.png")
    (farm / "sub").symlink_to(elsewhere, target_is_directory=True)
    assert load_rgb(image_path(farm, "a.png")).size == (8, 6)
    assert load_rgb(image_path(farm, "sub/real.png")).size == (8, 6)
    with pytest.raises(ImageLoadError, match="leaves the image folder"):
        image_path(farm, "../other_disk/real.png")
