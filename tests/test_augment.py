"""Copy-paste and test-time augmentation on hand-made tensors: exact, checkable behaviour."""

import torch

from tinyseg.data.copy_paste import copy_paste
from tinyseg.inference.tta import _unflip, merge_views


def _target(boxes_masks, label):
    masks = torch.zeros(len(boxes_masks), 20, 20, dtype=torch.uint8)
    for k, (y0, y1, x0, x1) in enumerate(boxes_masks):
        masks[k, y0:y1, x0:x1] = 1
    return {"masks": masks, "labels": torch.full((len(boxes_masks),), label), "image_id": label,
            "boxes": torch.zeros(len(boxes_masks), 4)}


def test_copy_paste_occludes_and_recomputes_boxes():
    torch.manual_seed(0)
    destination = _target([(0, 10, 0, 10), (12, 14, 12, 14)], label=1)
    source = _target([(5, 15, 5, 15)], label=2)
    images = [torch.zeros(3, 20, 20), torch.ones(3, 20, 20)]
    out_images, out_targets = copy_paste(images, [destination, source], probability=1.0)
    pasted = out_targets[0]
    assert pasted["labels"].tolist() == [1, 2]  # the small square (12:14) was hidden entirely
    assert pasted["masks"][0, 5:10, 5:10].sum() == 0 and pasted["masks"][0].sum() == 100 - 25
    assert torch.equal(out_images[0][:, 5:15, 5:15], torch.ones(3, 10, 10))
    assert pasted["boxes"].tolist() == [[0, 0, 10, 10], [5, 5, 15, 15]]


def test_copy_paste_skips_other_sizes_and_probability_zero():
    a, b = _target([(0, 5, 0, 5)], 1), _target([(0, 5, 0, 5)], 2)
    images = [torch.zeros(3, 20, 20), torch.ones(3, 20, 24)]
    b["masks"] = torch.zeros(1, 20, 24, dtype=torch.uint8)
    out_images, out_targets = copy_paste(images, [a, b], probability=1.0)
    assert out_targets[0]["labels"].tolist() == [1] and torch.equal(out_images[0], images[0])
    same = copy_paste([torch.zeros(3, 20, 20)] * 2, [a, a], probability=0.0)
    assert same[1][0] is a


def test_flip_is_undone_and_views_merge_with_mask_voting():
    width = 20
    mask = torch.zeros(1, 1, 10, width)
    mask[..., 2:6] = 1.0
    view = {"boxes": torch.tensor([[2.0, 0.0, 6.0, 10.0]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]), "masks": mask}
    flipped = {"boxes": torch.tensor([[width - 6.0, 0.0, width - 2.0, 10.0]]), "scores": torch.tensor([0.7]),
               "labels": torch.tensor([1]), "masks": mask.flip(-1) * 0.5}
    restored = _unflip(flipped, width)
    assert restored["boxes"].tolist() == [[2.0, 0.0, 6.0, 10.0]]
    assert torch.equal(restored["masks"], mask * 0.5)
    other = {"boxes": torch.tensor([[12.0, 0.0, 16.0, 10.0]]), "scores": torch.tensor([0.8]),
             "labels": torch.tensor([2]), "masks": torch.zeros(1, 1, 10, width)}
    merged = merge_views([view, restored, other], nms_thresh=0.5, max_detections=10)
    assert merged["labels"].tolist() == [1, 2]
    assert torch.allclose(merged["scores"], torch.tensor([0.9, 0.8]))
    # Score-weighted mean of the two views' masks: (0.9 * 1 + 0.7 * 0.5) / 1.6
    assert torch.allclose(merged["masks"][0, 0, 0, 3], torch.tensor((0.9 + 0.35) / 1.6))
