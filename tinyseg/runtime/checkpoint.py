"""Checkpoints: written atomically (temp file, fsync, rename) and read back with weights_only=True."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

FORMAT = "tinyseg-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    from .. import __version__

    state = {"format": FORMAT, "tinyseg_version": __version__, **state}
    atomic_write(path, lambda out: torch.save(state, out))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tinyseg checkpoint safely; pickled code, truncation and foreign files get clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix.lower() in (".onnx", ".xml"):  # torch.load would call it pickled code
        raise CheckpointError(f"{path}: an exported model, not a checkpoint: exported models run with"
                              " `tinyseg predict --onnx`")
    with path.open("rb") as handle:
        start = handle.read(16)
    # torch.save writes a zip (or, before 1.6, a pickle); torch.load takes other bytes for pickled code.
    if not start.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{path}: not a tinyseg checkpoint (not a file torch.save wrote: it begins"
                              f" {start!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # PyTorch's wording around it varies by version
        raise CheckpointError(f"{path}: refused: it carries pickled objects that are not plain tensors and"
                              " values (weights_only=True would have to execute code)"
                              + (f": it would load {found.group(1)}" if found else "")) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: cannot be read; the file is truncated or corrupt ({error})") from None
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as error:  # the unpickler on other bytes
        raise CheckpointError(f"{path}: not a tinyseg checkpoint (torch.load: {type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tinyseg checkpoint (no '{FORMAT}' marker)")
    return state
