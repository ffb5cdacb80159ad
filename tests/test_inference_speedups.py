"""Each inference speed-up must give the same detections as the plain path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image
from torchvision.ops.misc import FrozenBatchNorm2d

from tinyseg.config import InputConfig, ModelConfig, PredictConfig
from tinyseg.data.coco import CategoryMap
from tinyseg.inference.masks import encode_masks, paste_masks_binary
from tinyseg.inference.predictor import to_coco_results
from tinyseg.model import build_model, prepare_for_inference, set_precision
from tinyseg.model.for_inference import fold_frozen_batchnorm
from tinyseg.model.roi_pool import GatherMultiScaleRoIAlign


def random_boxes(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    sizes = torch.rand(count, 2, generator=generator) * 120 + 1
    return torch.cat([corners, corners + sizes], dim=1)


def test_gathered_roi_align_equals_torchvision(monkeypatch):
    """Two images, RoIs on every level, boxes at and beyond the map's edges and below a pixel."""
    from tinyseg.model import roi_pool

    gathered_calls = []
    gather = roi_pool.gathered_roi_align
    monkeypatch.setattr(roi_pool, "gathered_roi_align", lambda *a: gathered_calls.append(1) or gather(*a))
    generator = torch.Generator().manual_seed(0)
    features = {str(level): torch.randn(2, 8, 64 // 2**level, 80 // 2**level, generator=generator) for level in range(4)}
    boxes = [random_boxes(generator, 300, 256, 320), random_boxes(generator, 170, 256, 320)]
    boxes[0][:4] = torch.tensor([[0.0, 0.0, 320.0, 256.0], [318.0, 250.0, 330.0, 270.0], [5.0, 5.0, 5.2, 5.1],
                                 [-6.0, -9.0, 40.0, 30.0]])
    boxes[1][:2] = torch.tensor([[0.0, 0.0, 900.0, 700.0], [100.0, 80.0, 101.0, 81.0]])
    shapes = [(256, 320), (256, 320)]
    for size in (7, 14):
        plain = MultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)
        gathered = GatherMultiScaleRoIAlign(["0", "1", "2", "3"], size, 2)
        with torch.no_grad():
            expected = plain(features, boxes, shapes)
            assert len(set(plain.map_levels(boxes).tolist())) == 4
            torch.testing.assert_close(gathered(features, boxes, shapes), expected, atol=1e-4, rtol=1e-4)
            empty = gathered(features, [torch.zeros(0, 4), torch.zeros(0, 4)], shapes)
            one_empty = [boxes[0], torch.zeros(0, 4)]
            torch.testing.assert_close(gathered(features, one_empty, shapes), plain(features, one_empty, shapes),
                                       atol=1e-4, rtol=1e-4)
            # bf16 maps (a whole model under autocast) pool in fp32, as torchvision's kernel does there
            half = {name: level.bfloat16() for name, level in features.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.testing.assert_close(gathered(half, boxes, shapes), plain(half, boxes, shapes))
        assert empty.shape == (0, 8, size, size)
    assert len(gathered_calls) == 8  # the gather ran, not torchvision's kernel behind it
    # training: the same gradient into every level's features
    for level in features.values():
        level.requires_grad_(True)
    upstream = torch.randn(expected.shape[0], 8, 14, 14, generator=generator)
    grads = []
    for pool in (plain, gathered):
        grads.append(torch.autograd.grad((pool(features, boxes, shapes) * upstream).sum(), list(features.values())))
    for plain_grad, gathered_grad in zip(*grads):
        torch.testing.assert_close(gathered_grad, plain_grad, atol=1e-4, rtol=1e-4)
    assert len(gathered_calls) == 9


def frozen_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", init="none", norm="frozen_bn", fpn_channels=32,
                                    box_head_dim=64), 4,
                        test=InputConfig(test_min_size=128, test_max_size=160), predict=PredictConfig(score_thresh=0.0))
    for module in model.modules():  # statistics as a pretrained trunk would have them
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_folding_frozen_batchnorm_keeps_the_features():
    model = frozen_bn_model()
    image = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        before = model.backbone(image)
        assert fold_frozen_batchnorm(model.backbone.body) == 20  # stem + 8 blocks x 2 + 3 downsamples
        after = model.backbone(image)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_prepared_model_finds_the_same_detections(channels_last):
    model = frozen_bn_model()
    images = [torch.rand(3, 100, 130), torch.rand(3, 120, 90)]
    with torch.no_grad():
        expected = model(images)
        prepare_for_inference(model, None, channels_last)
        assert model.backbone.channels_last == channels_last  # frozen BN folded: no GroupNorm in the way
        deconv = model.roi_heads.mask_predictor.conv5_mask.weight
        assert deconv.is_contiguous(memory_format=torch.channels_last) == channels_last  # the heads follow
        found = model(images)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-3, atol=1e-3)


def test_group_norm_models_skip_channels_last_on_cpu():
    gn = ModelConfig(backbone="resnet18", init="none", norm="gn", fpn_channels=32, box_head_dim=64)
    model = build_model(gn, 4)
    prepare_for_inference(model, None, True)
    assert not model.backbone.channels_last
    model = build_model(gn, 4).train()  # as the trainer sets it: slower channels-last in training too
    set_precision(model, None, True)
    assert not model.backbone.channels_last
    assert model.backbone.body.conv1.weight.is_contiguous()
    model = frozen_bn_model().train()
    set_precision(model, None, True)
    assert model.backbone.channels_last


def test_bf16_inference_keeps_heads_outputs_in_fp32():
    model = prepare_for_inference(frozen_bn_model(), torch.bfloat16, False)
    assert model.roi_heads.box_head.fc6.weight.dtype == torch.bfloat16
    assert model.roi_heads.box_predictor.cls_score.weight.dtype == torch.float32  # decoding stays fp32
    with torch.no_grad():
        output = model([torch.rand(3, 100, 130)])[0]
    assert output["boxes"].dtype == output["scores"].dtype == output["masks"].dtype == torch.float32
    assert len(output["scores"]) > 0


@pytest.mark.parametrize("height,width", [(90, 130), (257, 31)])
def test_binary_paste_equals_torchvision_paste(height, width):
    generator = torch.Generator().manual_seed(height)
    probs = torch.rand(25, 1, 28, 28, generator=generator)
    # clipped to the image as the model's boxes are; the paste's box expansion still crosses the edges
    boxes = clip_boxes_to_image(random_boxes(generator, 25, height, width) - 20, (height, width))
    boxes[0] = torch.tensor([10.0, 10.0, 10.2, 10.3])  # a sub-pixel box
    expected = (paste_masks_in_image(probs, boxes, (height, width))[:, 0] >= 0.5).numpy()
    found = paste_masks_binary(probs, boxes, height, width, 0.5)
    assert found.flags.f_contiguous and found.shape == (height, width, 25)
    assert np.array_equal(found.transpose(2, 0, 1), expected)
    assert encode_masks(found, channels_last=True) == encode_masks(expected)


def test_binary_paste_of_a_box_outside_the_image_is_empty():
    # torchvision's paste raises on such a box; the model clips boxes first, but a caller may not
    outside = torch.tensor([[135.0, 3.0, 170.0, 30.0]])
    assert not paste_masks_binary(torch.ones(1, 1, 28, 28), outside, 90, 130, 0.5).any()


def test_results_from_mask_probs_equal_results_from_pasted_masks():
    model = frozen_bn_model()
    categories = CategoryMap([3, 7, 12], ["a", "b", "c"])
    image = torch.rand(3, 100, 130)
    with torch.no_grad():
        pasted = model([image])[0]
        model.transform.paste_masks = False
        unpasted = model([image])[0]
    assert "mask_probs" in unpasted and "masks" not in unpasted
    expected = to_coco_results(pasted, 5, categories, 0.5)
    assert len(expected) > 0
    assert to_coco_results(unpasted, 5, categories, 0.5, (100, 130)) == expected


def test_amp_choice_reaches_the_loaded_model(trained_run):
    from tinyseg.inference.predictor import load_model

    checkpoint = str(trained_run["run_dir"] / "best.pt")
    fp32 = load_model(checkpoint, "cpu", amp="none").model
    assert fp32.roi_heads.box_head.amp_dtype is None
    assert fp32.roi_heads.box_head.fc6.weight.dtype == torch.float32
    bf16 = load_model(checkpoint, "cpu", amp="bf16").model
    assert bf16.roi_heads.box_head.amp_dtype == torch.bfloat16
    assert bf16.roi_heads.box_head.fc6.weight.dtype == torch.bfloat16


def test_traced_roi_align_merges_the_levels_in_the_rois_order():
    """The ONNX path's gather merge gives torchvision's pooled rows, for boxes on every FPN level."""
    torch.manual_seed(0)
    features = {str(level): torch.rand(1, 8, 64 >> level, 80 >> level) for level in range(4)}
    corners = torch.rand(60, 2) * torch.tensor([200.0, 150.0])
    sizes = torch.rand(60, 1) * 500 + 4  # small to large: levels 0 to 3 (level 3 from 448 px on)
    boxes = [torch.cat([corners, corners + sizes], dim=1)]
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    merged = GatherMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = reference(features, boxes, [(256, 320)])
    assert len(set(reference.map_levels(boxes).tolist())) == 4
    torch.testing.assert_close(merged._traced_forward(features, boxes, [(256, 320)]), expected)
