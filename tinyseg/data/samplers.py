"""Batch sampling, kept apart from the data: aspect-ratio grouping, repeat factors, and sharding by rank.

Every rank builds the same shuffled order from (seed, epoch), takes its own slice of it, and yields
exactly len(slice) // batch_size batches, so all ranks step the same number of times per epoch.
Batches are lists of (index, epoch) pairs: the dataset seeds each sample's augmentation from them, so
a sample's augmentation never depends on which worker loads it or on what came before (exact resume).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def repeat_factors(image_labels: list[list[int]], threshold: float) -> list[float]:
    """LVIS repeat-factor sampling: r(c) = max(1, sqrt(t / f(c))), an image takes its rarest class's r."""
    if threshold <= 0:
        return [1.0] * len(image_labels)
    counts: dict[int, int] = defaultdict(int)
    for labels in image_labels:
        for label in set(labels):
            counts[label] += 1
    total = max(1, len(image_labels))
    factor = {c: max(1.0, math.sqrt(threshold / (n / total))) for c, n in counts.items()}
    return [max((factor[c] for c in set(labels)), default=1.0) for labels in image_labels]


class TrainBatchSampler(torch.utils.data.Sampler):
    def __init__(self, aspect_ratios: list[float], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, group_by_aspect: bool = True, factors: list[float] | None = None):
        self.groups = [0 if ratio >= 1.0 else 1 for ratio in aspect_ratios] if group_by_aspect else [0] * len(aspect_ratios)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.factors = factors
        self.epoch = 0
        # batches to leave out at the start of this epoch (a mid-epoch resume); the trainer sets it every
        # epoch. Not cleared by __iter__: a DataLoader with workers calls __iter__ twice on its first iterator
        # (torch's _BaseDataLoaderIter.__init__, then _reset), and the second call must skip too.
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.factors is None:
            indices = list(range(len(self.groups)))
        else:
            # Stochastic rounding of each image's repeat factor, new draws every epoch.
            draws = torch.rand(len(self.factors), generator=generator).tolist()
            indices = [i for i, f in enumerate(self.factors) for _ in range(int(f) + (draws[i] < f - int(f)))]
        order = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[i] for i in order]
        per_rank = math.ceil(len(shuffled) / self.world_size)
        padded = shuffled + shuffled[: per_rank * self.world_size - len(shuffled)]
        return padded[self.rank::self.world_size]

    def _batches(self) -> list[list[int]]:
        buckets: dict[int, list[int]] = defaultdict(list)
        batches = []
        for index in self._indices():
            bucket = buckets[self.groups[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        leftovers = [i for g in sorted(buckets) for i in buckets[g]]
        batches += [leftovers[i:i + self.batch_size] for i in range(0, len(leftovers) - self.batch_size + 1, self.batch_size)]
        return batches

    def __iter__(self):
        batches = self._batches()
        return iter([[(index, self.epoch) for index in batch] for batch in batches[self.skip_batches:]])

    def __len__(self) -> int:
        return len(self._indices()) // self.batch_size
