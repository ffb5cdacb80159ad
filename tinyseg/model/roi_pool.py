"""Multi-scale RoIAlign on a CPU as one weighted gather of feature rows.

torchvision's CPU roi_align kernel runs on one thread and reads each channel plane with scalar loads:
with 1,000 proposals per image a large share of inference time (benchmarks/README.md, "Each speed-up
alone"). RoIAlign is a fixed set of bilinear taps per output bin (sampling_ratio^2 samples, 4
neighbours each), so with the feature maps laid out as rows of channels (H*W x C) every bin is a
weighted sum of rows: torch's embedding_bag, which runs on all cores and vectorises over channels,
for all levels and images in one call. The taps and their edge rules are torchvision's (aligned=False).
In training its backward (each bin's gradient added back to its rows) is torchvision's too. Other devices,
and the ONNX export, keep torchvision's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align


class GatherMultiScaleRoIAlign(MultiScaleRoIAlign):
    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if torchvision._is_tracing():
            return self._traced_forward(x, boxes, image_shapes)
        if next(iter(x.values())).device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        features, rois, levels = self._levelled(x, boxes, image_shapes)
        return gathered_roi_align(features, rois, levels, self.scales, self.output_size, self.sampling_ratio)

    def _traced_forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """torchvision's multi-scale RoIAlign for ONNX, with the levels merged by one row gather instead of
        torchvision's scatter of every element (ScatterElements; its cost: benchmarks/README.md)."""
        features, rois, levels = self._levelled(x, boxes, image_shapes)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            rows = torch.where(levels == level)[0]
            pooled.append(roi_align(feature, rois[rows], self.output_size, scale, self.sampling_ratio))
            order.append(rows)
        # The rows come level by level; sorting their original indices puts them back in the RoIs' order.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def _levelled(self, x: dict[str, Tensor], boxes: list[Tensor],
                  image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
        """The pooled feature maps, the RoIs as (image index, box) rows and each RoI's level, as torchvision
        sets them up (its level mapper gives level 0 when there is one map)."""
        # torchvision's private helpers, imported here so that a rename upstream breaks only this class
        from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        return features, _convert_to_roi_format(boxes), self.map_levels(boxes)


def gathered_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                       output_size: tuple[int, int], sampling_ratio: int) -> Tensor:
    """torchvision's roi_align (aligned=False) of each RoI on its level: (R, C, *output_size).

    rois: (R, 5) rows of (image index, x1, y1, x2, y2) in image pixels; levels: (R,) index into features.
    """
    channels, dtype = features[0].shape[1], features[0].dtype
    # bf16/fp16 maps are pooled in fp32, as torchvision's kernel runs under autocast
    pooled_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # One table of rows for every level and image; a RoI's rows start at its level's offset.
    table = torch.cat([f.to(pooled_dtype).permute(0, 2, 3, 1).reshape(-1, channels) for f in features])
    sizes = torch.tensor([f.shape[-2:] for f in features])
    starts = torch.tensor([0] + [f.numel() // channels for f in features]).cumsum(0)[:-1]
    height, width = sizes[levels, 0], sizes[levels, 1]
    box = rois[:, 1:].to(pooled_dtype) * torch.tensor(scales, dtype=pooled_dtype)[levels, None]
    ys, y_weights = _taps(box[:, 1], box[:, 3] - box[:, 1], output_size[0], sampling_ratio, height)
    xs, x_weights = _taps(box[:, 0], box[:, 2] - box[:, 0], output_size[1], sampling_ratio, width)
    first_row = starts[levels] + rois[:, 0].long() * height * width
    # (R, bins_y, bins_x, taps_y, taps_x): every sample's four neighbours in one bag per bin
    rows = (first_row[:, None, None, None, None] + (ys * width[:, None, None])[:, :, None, :, None]
            + xs[:, None, :, None, :])
    weights = y_weights[:, :, None, :, None] * x_weights[:, None, :, None, :] / sampling_ratio**2
    count, bins, taps = len(rois), output_size[0] * output_size[1], (2 * sampling_ratio) ** 2
    pooled = F.embedding_bag(rows.reshape(count * bins, taps), table, mode="sum",
                             per_sample_weights=weights.reshape(count * bins, taps).to(pooled_dtype))
    return pooled.view(count, *output_size, channels).permute(0, 3, 1, 2).contiguous().to(dtype)


def _taps(start: Tensor, length: Tensor, bins: int, samples: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Along one axis: each bin's sample points and their two bilinear neighbours, (R, bins, samples * 2)
    indices and weights, with torchvision's rules (a box at least 1 px; points beyond one pixel outside
    the map weigh nothing; the last row or column is clamped)."""
    step = (torch.arange(bins * samples, dtype=start.dtype) + 0.5) / samples
    points = start[:, None] + step * (length.clamp(min=1.0) / bins)[:, None]
    size = size[:, None].to(points.dtype)
    inside = (points >= -1) & (points <= size)
    points = points.clamp(min=0)
    low = points.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    points = torch.where(at_edge, low, points)
    high = torch.where(at_edge, low, low + 1)
    fraction = points - low
    indices = torch.stack([low, high], dim=-1).long()
    weights = torch.stack([1 - fraction, fraction], dim=-1) * inside[..., None]
    return indices.view(len(start), bins, samples * 2), weights.view(len(start), bins, samples * 2)
