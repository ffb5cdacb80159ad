"""labelme images that exist only inside their JSON (`imageData`), read without writing into the dataset.

A dataset has one image folder, so when some images are only embedded, the images are read from a folder in
the user's cache ($XDG_CACHE_HOME/tinyseg/labelme, default ~/.cache/...) that holds every image of the
dataset under its file_name: a link to each image on disk (image_path follows links) and each embedded image
decoded to a file. The folder is named by its content, so an unchanged dataset reuses it, and processes that
read the same dataset at once (torchrun ranks) build it into a temporary folder and rename it, one winning.
`tinyseg convert` copies the decoded images next to its output (mirror), so its output does not depend on the
cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ...runtime.files import atomic_write
from .common import link_or_copy

CACHE_ENV = "XDG_CACHE_HOME"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache") / "tinyseg" / "labelme"


def is_cached(path: str | Path) -> bool:
    """True for a file or folder inside the cache (links resolved: a link to the user's image is not)."""
    return cache_root().resolve() in Path(path).resolve().parents or Path(path).resolve() == cache_root().resolve()


def image_folder(files: list[tuple[str, Path | bytes]]) -> Path:
    """The cache folder holding each (file_name, image file on disk or embedded bytes); OSError if the cache
    cannot be written."""
    key = hashlib.sha1()
    for name, source in sorted(files, key=lambda item: item[0]):
        what = hashlib.sha1(source).hexdigest() if isinstance(source, bytes) else str(Path(source).resolve())
        key.update(f"{name}\0{what}\n".encode("utf-8"))
    folder = cache_root() / key.hexdigest()[:24]
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, source in files:
            if isinstance(source, bytes):
                atomic_write(building / name, lambda out, content=source: out.write(content))
            else:
                link_or_copy(source, building / name)
        os.rename(building, folder)
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
        if not folder.is_dir():  # not another process that finished first
            raise
    return folder


def mirror(folder: str | Path, target: str | Path) -> None:
    """The cache folder's images at `target`: links to the user's images, copies of the decoded ones."""
    folder, target = Path(folder), Path(target)
    for path in sorted(folder.rglob("*")):
        destination = target / path.relative_to(folder)
        if path.is_symlink():
            link_or_copy(path, destination)
        elif path.is_file():
            atomic_write(destination, lambda out, source=path: out.write(source.read_bytes()))
