"""Train/val split by image, seeded, with duplicate images kept on the same side.

The reference solution's validation leaked: the same picture sat in train and val under two ids.
Here images whose bytes are equal, or whose contrast-normalised thumbnails correlate >= 0.97
(re-encoded or resized copies), form one group, and whole groups go to one side.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np

from .coco import ImageRecord
from .images import image_path, image_signature


def content_keys(image_dir: str | Path, record: ImageRecord) -> list[str]:
    """Exact keys: the file's bytes and its name. Near copies are found by near_duplicate_pairs."""
    path = image_path(image_dir, record.file_name)
    return [f"bytes:{hashlib.md5(path.read_bytes()).hexdigest()}", f"name:{record.file_name}"]


def near_duplicate_pairs(signatures: np.ndarray, min_similarity: float = 0.97) -> list[tuple[int, int]]:
    """Index pairs whose thumbnails correlate at least min_similarity (all pairs, one matrix product)."""
    similarity = signatures @ signatures.T
    first, second = np.nonzero(np.triu(similarity >= min_similarity, k=1))
    return list(zip(first.tolist(), second.tolist()))


def duplicate_groups(image_dir: str | Path, records: list[ImageRecord]) -> list[list[int]]:
    """Indices of records grouped so that duplicates share a group (union-find over exact and near keys)."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index, record in enumerate(records):
        for key in content_keys(image_dir, record):
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    signatures = np.stack([image_signature(image_dir, r.file_name) for r in records])
    for first, second in near_duplicate_pairs(signatures):
        parent[find(first)] = find(second)
    groups: dict[int, list[int]] = {}
    for index in range(len(records)):
        groups.setdefault(find(index), []).append(index)
    return list(groups.values())


def split_records(image_dir: str | Path, records: list[ImageRecord], val_fraction: float,
                  seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val), reproducible for a seed; no image, nor any duplicate of it, is on both sides."""
    if val_fraction <= 0:
        return list(records), []
    groups = sorted(duplicate_groups(image_dir, records), key=lambda g: records[g[0]].image_id)
    random.Random(seed).shuffle(groups)
    wanted = max(1, round(val_fraction * len(records)))
    val_indices: list[int] = []
    for group in groups:
        if len(val_indices) >= wanted:
            break
        val_indices.extend(group)
    chosen = set(val_indices)
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def fold_assignments(image_dir: str | Path, records: list[ImageRecord], k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each record for k-fold cross-validation, reproducible for a seed.

    Whole duplicate groups go to one fold, so no picture is trained on and scored in the same fold.
    Groups are shuffled by seed, then placed largest first on the fold with the fewest images: fold
    sizes then differ by at most the largest group's size (one image when there are no duplicates).
    """
    groups = sorted(duplicate_groups(image_dir, records), key=lambda g: records[g[0]].image_id)
    if k < 2 or k > len(groups):
        raise ValueError(f"{k} folds need 2 to {len(groups)} groups of distinct images"
                         f" ({len(records)} images, {len(records) - len(groups)} duplicates)")
    random.Random(seed).shuffle(groups)
    groups.sort(key=len, reverse=True)  # stable: equal sizes keep the seeded order
    sizes = [0] * k
    folds = [-1] * len(records)
    for group in groups:
        fold = sizes.index(min(sizes))
        sizes[fold] += len(group)
        for index in group:
            folds[index] = fold
    return folds
