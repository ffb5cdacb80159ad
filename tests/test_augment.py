"""Train-time augmentation (copy-paste, flipped copies) and test-time augmentation: exact, checkable behaviour."""

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from tinyseg.config import InputConfig
from tinyseg.data.augment import BatchTransform, CopyPaste, build
from tinyseg.data.mosaic import Mosaic
from tinyseg.data.coco import load_coco
from tinyseg.data.dataset import InstanceDataset, finalize_target
from tinyseg.inference.tta import _unflip, merge_views
from tinyseg.runtime.checkpoint import load_checkpoint
from tinyseg.training.trainer import Trainer

from conftest import tiny_config


def _target(boxes_masks, label):
    masks = torch.zeros(len(boxes_masks), 20, 20, dtype=torch.uint8)
    for k, (y0, y1, x0, x1) in enumerate(boxes_masks):
        masks[k, y0:y1, x0:x1] = 1
    return {"masks": masks, "labels": torch.full((len(boxes_masks),), label), "image_id": label,
            "boxes": torch.zeros(len(boxes_masks), 4)}


def _copy_paste(images, targets, probability):
    return CopyPaste(probability)(images, targets, torch.Generator().manual_seed(0))


def test_copy_paste_occludes_and_recomputes_boxes():
    destination = _target([(0, 10, 0, 10), (12, 14, 12, 14)], label=1)
    source = _target([(5, 15, 5, 15)], label=2)
    images = [torch.zeros(3, 20, 20), torch.ones(3, 20, 20)]
    out_images, out_targets = _copy_paste(images, [destination, source], probability=1.0)
    pasted = out_targets[0]
    assert pasted["labels"].tolist() == [1, 2]  # the small square (12:14) was hidden entirely
    assert pasted["masks"][0, 5:10, 5:10].sum() == 0 and pasted["masks"][0].sum() == 100 - 25
    assert torch.equal(out_images[0][:, 5:15, 5:15], torch.ones(3, 10, 10))
    assert pasted["boxes"].tolist() == [[0, 0, 10, 10], [5, 5, 15, 15]]


def test_copy_paste_skips_other_sizes_and_probability_zero():
    a, b = _target([(0, 5, 0, 5)], 1), _target([(0, 5, 0, 5)], 2)
    images = [torch.zeros(3, 20, 20), torch.ones(3, 20, 24)]
    b["masks"] = torch.zeros(1, 20, 24, dtype=torch.uint8)
    out_images, out_targets = _copy_paste(images, [a, b], probability=1.0)
    assert out_targets[0]["labels"].tolist() == [1] and torch.equal(out_images[0], images[0])
    same = _copy_paste([torch.zeros(3, 20, 20)] * 2, [a, a], probability=0.0)
    assert same[1][0] is a


def test_flip_is_undone_and_views_merge_with_mask_voting():
    width = 20
    probs = torch.zeros(1, 1, 28, 28)
    probs[..., :14] = 1.0  # the left half of the box
    view = {"boxes": torch.tensor([[2.0, 0.0, 6.0, 10.0]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]), "mask_probs": probs}
    flipped = {"boxes": torch.tensor([[width - 6.0, 0.0, width - 2.0, 10.0]]), "scores": torch.tensor([0.7]),
               "labels": torch.tensor([1]), "mask_probs": probs.flip(-1) * 0.5}
    restored = _unflip(flipped, width)
    assert restored["boxes"].tolist() == [[2.0, 0.0, 6.0, 10.0]]
    assert torch.equal(restored["mask_probs"], probs * 0.5)
    other = {"boxes": torch.tensor([[12.0, 0.0, 16.0, 10.0]]), "scores": torch.tensor([0.8]),
             "labels": torch.tensor([2]), "mask_probs": torch.zeros(1, 1, 28, 28)}
    merged = merge_views([view, restored, other], nms_thresh=0.5, max_detections=10)
    assert merged["labels"].tolist() == [1, 2]
    assert torch.allclose(merged["scores"], torch.tensor([0.9, 0.8]))
    # Score-weighted mean of the two views' masks: (0.9 * 1 + 0.7 * 0.5) / 1.6
    assert torch.allclose(merged["mask_weights"], torch.tensor([[0.9 / 1.6, 0.7 / 1.6, 0.0], [0.0, 0.0, 1.0]]))


def test_tta_with_no_detections_gives_no_masks():
    from tinyseg.inference.predictor import binary_masks

    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "mask_probs": torch.zeros(0, 1, 28, 28)}
    merged = merge_views([empty, _unflip(empty, 30)], nms_thresh=0.5, max_detections=10)
    assert merged["boxes"].shape == (0, 4) and binary_masks(merged, 0.5, (20, 30)).shape == (20, 30, 0)


def test_tta_masks_are_torchvisions_pasted_masks_mixed_then_thresholded():
    """The merged masks equal pasting every view at full size the torchvision way, mixing by the weights
    and thresholding: what TTA did before it stopped holding full-size float masks."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from tinyseg.inference.masks import paste_merged_binary

    generator = torch.Generator().manual_seed(0)
    height, width, count = 37, 53, 7
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([width - 8.0, height - 8.0])
    sizes = 4 + torch.rand(count, 2, generator=generator) * 20
    boxes = torch.cat([corners, corners + sizes], dim=1)
    boxes[0] = torch.tensor([-5.0, -3.0, 20.0, 12.0])  # partly outside the image
    probs = torch.rand(count, 1, 28, 28, generator=generator)
    weights = torch.rand(3, count, generator=generator) * (torch.rand(3, count, generator=generator) > 0.4)
    weights[:, 0] += 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    full = paste_masks_in_image(probs, boxes, (height, width), padding=1)[:, 0]
    expected = (torch.einsum("kn,nhw->khw", weights, full) >= 0.5).numpy().transpose(1, 2, 0)
    found = paste_merged_binary(probs, boxes, weights, height, width, 0.5)
    assert found.shape == (height, width, 3) and found.flags.f_contiguous
    assert (found != expected).sum() <= 2  # float summation order can flip a pixel sitting on 0.5
    assert found.sum() > 0


def _batch_of_six():
    """Six 20x20 images of four instances each, every instance a different size: a draw shows in the sums."""
    images, targets = [], []
    for k in range(6):
        images.append(torch.full((3, 20, 20), float(k)))
        targets.append(_target([(j, j + 3 + k, 4 * j, 4 * j + 2 + j) for j in range(4)], label=k + 1))
    return images, targets


def _fingerprint(batch):
    images, targets = batch
    return [(image.sum().item(), t["masks"].flatten(1).sum(1).tolist(), t["labels"].tolist())
            for image, t in zip(images, targets)]


def test_copy_paste_draws_per_batch_from_its_own_generator():
    transform = build(InputConfig(copy_paste_prob=0.5), seed=3).batch
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = _fingerprint(transform(*_batch_of_six(), epoch=2, batch_index=5))
    assert torch.equal(torch.get_rng_state(), state)  # the model's draws are left alone
    torch.manual_seed(1)  # whatever the global RNG holds, the batch's draws are the same
    assert _fingerprint(transform(*_batch_of_six(), epoch=2, batch_index=5)) == first
    assert first != _fingerprint(_batch_of_six())  # it did paste
    assert _fingerprint(transform(*_batch_of_six(), epoch=2, batch_index=6)) != first
    assert _fingerprint(transform(*_batch_of_six(), epoch=3, batch_index=5)) != first
    other_rank = build(InputConfig(copy_paste_prob=0.5), seed=3, rank=1).batch
    assert _fingerprint(other_rank(*_batch_of_six(), epoch=2, batch_index=5)) != first


def test_without_batch_ops_the_batch_passes_through():
    images, targets = _batch_of_six()
    state = torch.get_rng_state()
    out_images, out_targets = BatchTransform([], seed=3)(images, targets, 0, 0)
    assert all(a is b for a, b in zip(out_images + out_targets, images + targets))
    assert torch.equal(torch.get_rng_state(), state)


def test_flipped_copies_mirror_the_plain_copies(shapes):
    data = load_coco(shapes["train"])
    n = len(data.images)
    # No random flip, and the images' short side is already min_size: what is left is the copies' own flip.
    sample = build(InputConfig(copies=3, flipped_copies=1, hflip_prob=0.0, min_size=[96], max_size=160)).sample
    dataset = InstanceDataset(data.images, shapes["images"], data.categories, sample, copies=3)
    assert len(dataset) == 3 * n
    for index in (0, 1):
        (flipped, flipped_target), (plain, plain_target), (again, _) = (dataset[(index + k * n, 0)] for k in range(3))
        assert torch.equal(flipped, F.horizontal_flip(plain)) and not torch.equal(flipped, plain)
        assert torch.equal(flipped_target["masks"], F.horizontal_flip(plain_target["masks"]))
        width = plain.shape[-1]
        x0, y0, x1, y1 = plain_target["boxes"].unbind(1)
        mirrored = torch.stack([width - x1, y0, width - x0, y1], dim=1)
        assert torch.equal(flipped_target["boxes"], mirrored)
        assert torch.equal(again, plain)


def test_photometric_jitter_keeps_colours_unless_channels_are_permuted():
    """torchvision's RandomPhotometricDistort shuffles the channels half the time, which turns a brown date
    into a purple fig; tinyseg's photometric jitter keeps the channel order unless told otherwise."""
    from torchvision import tv_tensors

    red = tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8))
    red[0] = 200
    target = {"masks": tv_tensors.Mask(torch.ones(1, 8, 8, dtype=torch.bool)), "labels": torch.tensor([1]),
              "boxes": tv_tensors.BoundingBoxes([[0, 0, 8, 8]], format="XYXY", canvas_size=(8, 8))}

    def dominant_channels(channel_permutation: bool) -> set[int]:
        pipeline = build(InputConfig(min_size=[8], max_size=8, hflip_prob=0.0, photometric=True,
                                     channel_permutation=channel_permutation)).sample
        torch.manual_seed(0)
        return {int(pipeline(red, target)[0].mean(dim=(1, 2)).argmax()) for _ in range(40)}

    assert dominant_channels(False) == {0}
    assert len(dominant_channels(True)) > 1


@pytest.mark.parametrize("where, workers", [("after_step", 0), ("inside_step", 1)])
def test_mixing_run_resumed_mid_epoch_matches_an_uninterrupted_one(shapes, tmp_path, monkeypatch, where, workers):
    """Ctrl-C right after step 1, or inside step 2 before its optimizer step (that batch then runs again), with
    the loader in-process or in a persistent worker (whose first iterator takes a draw from the global RNG);
    with both augmentations that mix images, copy-paste in the batch and mosaic in the dataset."""
    # 8 images in batches of 2: 4 steps per epoch; the interruption falls after step 1 of 2.
    settings = ("input.copy_paste_prob=1.0", "input.mosaic_prob=0.5", "solver.max_iters=2", "solver.warmup_iters=1",
                "input.min_size=[64]", "input.max_size=96", "data.val_json=", "data.val_fraction=0",
                "input.aspect_ratio_grouping=false", f"data.num_workers={workers}")
    Trainer(tiny_config(shapes, tmp_path / "straight", *settings)).fit()

    config = tiny_config(shapes, tmp_path / "resumed", *settings)
    interrupted = Trainer(config)
    hooked = "_log_step" if where == "after_step" else "_optimizer_step"
    original = getattr(interrupted, hooked)

    def stop_at_step_two(*args):
        if where == "after_step":
            original(*args)
        if interrupted.iteration == 1:
            raise KeyboardInterrupt
        if where == "inside_step":
            original(*args)

    monkeypatch.setattr(interrupted, hooked, stop_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch_step"] == 1  # mid-epoch
    Trainer(config, resume=True).fit()

    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    reference = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert resumed["iteration"] == reference["iteration"] == 2
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def _mosaic_sample(value: float, boxes_masks: list, label: int, size: int = 20):
    """A square image of one grey value, with rectangle instances (y0, y1, x0, x1) of one label."""
    image, target = torch.full((3, size, size), value), _target(boxes_masks, label)
    target["masks"] = target["masks"][:, :size, :size]
    return image, target


def test_mosaic_shows_each_image_beside_the_centre_and_drops_instances_cut_to_a_sliver():
    whole = (0, 20, 0, 20)
    # Image 0's instances: its bottom-right quarter (all shown), its top-left quarter (not shown), a strip
    # half shown, and a column with 1 of its 11 pixels shown (under a tenth: dropped).
    first = _mosaic_sample(0.1, [(10, 20, 10, 20), (0, 10, 0, 10), (0, 20, 15, 20), (0, 11, 12, 13)], label=1)
    samples = [first, *(_mosaic_sample(0.1 * k, [whole], label=k) for k in (2, 3, 4))]
    image, target = Mosaic(1.0).compose(samples, centre=[1.0, 1.0], zoom=1.0)
    # At zoom 1 about the middle, each image shows the quarter that touches the centre, its masks with it.
    quarters = [(slice(0, 10), slice(0, 10)), (slice(0, 10), slice(10, 20)), (slice(10, 20), slice(0, 10)),
                (slice(10, 20), slice(10, 20))]
    assert torch.equal(image[:, :10, :10], first[0][:, 10:, 10:])
    assert target["labels"].tolist() == [1, 1, 2, 3, 4]
    expected = torch.zeros(5, 20, 20, dtype=torch.uint8)
    expected[0][quarters[0]] = 1
    expected[1, 0:10, 5:10] = 1  # the strip's lower half
    for k, (quarter, value) in enumerate(zip(quarters[1:], (0.2, 0.3, 0.4))):
        expected[2 + k][quarter] = 1
        assert torch.allclose(image[(slice(None), *quarter)], torch.tensor(value))
    assert torch.equal(target["masks"], expected)

    # A zoom of 1.3 with a non-integer window: each piece is resized whole, then cut, so the shown quarter of
    # image 0 lands exactly where its pixels are (rows -16..10 of the output hold image 0's 26 zoomed rows).
    image, target = Mosaic(1.0).compose(samples, centre=[1.0, 1.0], zoom=1.3)
    assert torch.equal(finalize_target(target)["boxes"][0], torch.tensor([0.0, 0.0, 10.0, 10.0]))
    assert torch.allclose(image[:, :10, :10], torch.tensor(0.1))
    assert torch.allclose(image[:, 10:, 10:], torch.tensor(0.4))

    # At zoom 0.5 about the middle the window is the whole canvas: all four images whole at half size. A
    # smaller last image leaves part of its quarter to Ultralytics' grey.
    small = _mosaic_sample(0.4, [(0, 10, 0, 10)], label=4, size=10)
    image, target = Mosaic(1.0).compose([*samples[:3], small], centre=[1.0, 1.0], zoom=0.5)
    assert target["labels"].tolist() == [1, 1, 1, 1, 2, 3, 4]
    assert [m.nonzero().min(0).values.tolist() + m.nonzero().max(0).values.tolist() for m in target["masks"][-3:]] == [
        [0, 10, 9, 19], [10, 0, 19, 9], [10, 10, 14, 14]]
    assert torch.allclose(image[:, 10:15, 10:15], torch.tensor(0.4)) and torch.all(image[:, 15:, 15:] == 114 / 255)

    # A centre at the window's bottom-right corner shows the first image alone.
    image, target = Mosaic(1.0).compose(samples, centre=[1.5, 1.5], zoom=1.0)
    assert torch.equal(image, first[0]) and target["labels"].tolist() == [1, 1, 1, 1]


def test_mosaic_samples_are_four_images_in_one_and_repeat_for_their_seed(shapes):
    data = load_coco(shapes["train"])
    plain_config = InputConfig(min_size=[96], max_size=160, hflip_prob=0.0)
    assert build(plain_config).mosaic is None  # off by default: no draws taken, earlier runs repeat
    augmentation = build(InputConfig(min_size=[96], max_size=160, hflip_prob=0.0, mosaic_prob=1.0))
    plain = InstanceDataset(data.images, shapes["images"], data.categories, build(plain_config).sample)
    mosaic = InstanceDataset(data.images, shapes["images"], data.categories, augmentation.sample,
                             mosaic=augmentation.mosaic)
    for index in range(4):
        (image, target), (again, _), (alone, _) = mosaic[(index, 3)], mosaic[(index, 3)], plain[(index, 3)]
        assert torch.equal(image, again) and image.shape == alone.shape and not torch.equal(image, alone)
        assert not torch.equal(image, mosaic[(index, 4)][0])  # another epoch, another mosaic
        assert len(target["masks"]) == len(target["boxes"]) == len(target["labels"])
        assert all(m.any() for m in target["masks"])
