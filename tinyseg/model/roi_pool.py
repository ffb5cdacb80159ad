"""Multi-scale RoIAlign that uses more than one CPU core.

torchvision's CPU roi_align kernel runs on one thread: with 1,000 proposals per image a large share of
inference time (benchmarks/README.md, "Each speed-up alone"), while the other cores idle. The kernel
releases the GIL, so the RoIs are split into chunks pooled on parallel Python threads.
"""

from __future__ import annotations

import threading

import torch
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

MIN_ROIS_PER_CHUNK = 32  # below this a thread costs more than it saves


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if torchvision._is_tracing():
            return self._traced_forward(x, boxes, image_shapes)
        chunks = self._chunk_count(x, boxes)
        if chunks < 2:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None:  # torchvision sets these on the first call; not from two threads at once
            super().forward(x, [b[:1] for b in boxes], image_shapes)
        # Each chunk takes a contiguous slice of every image's boxes; results come back image by image.
        splits = [torch.tensor_split(torch.arange(len(b)), chunks) for b in boxes]
        parts: list[Tensor | None] = [None] * chunks

        def pool(index: int) -> None:
            parts[index] = super(ParallelMultiScaleRoIAlign, self).forward(
                x, [b[split[index]] for b, split in zip(boxes, splits)], image_shapes)

        threads = [threading.Thread(target=pool, args=(i,)) for i in range(1, chunks)]
        for thread in threads:
            thread.start()
        pool(0)
        for thread in threads:
            thread.join()
        if any(part is None for part in parts):
            raise RuntimeError("RoIAlign failed in a worker thread (see the traceback above)")
        per_image = [part.split([len(split[i]) for split in splits]) for i, part in enumerate(parts)]
        return torch.cat([piece for image in zip(*per_image) for piece in image])

    def _traced_forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """torchvision's multi-scale RoIAlign for ONNX, with the levels merged by one row gather instead of
        torchvision's scatter of every element (ScatterElements; its cost: benchmarks/README.md)."""
        # torchvision's private helpers, imported here so that a rename upstream breaks only the export
        from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            rows = torch.where(levels == level)[0]
            pooled.append(roi_align(feature, rois[rows], self.output_size, scale, self.sampling_ratio))
            order.append(rows)
        # The rows come level by level; sorting their original indices puts them back in the RoIs' order.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    @staticmethod
    def _chunk_count(x: dict[str, Tensor], boxes: list[Tensor]) -> int:
        first = next(iter(x.values()))
        if first.device.type != "cpu" or torch.is_grad_enabled():
            return 1
        rois = sum(len(b) for b in boxes)
        return max(1, min(torch.get_num_threads(), rois // MIN_ROIS_PER_CHUNK))
