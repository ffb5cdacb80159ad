import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from tinyseg.config import ModelConfig
from tinyseg.model import BackboneWeightsError, build_model
from tinyseg.model import weights as weights_module


def test_scratch_model_trains_everything_with_learning_norm():
    model = build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64), 4)
    trunk = model.backbone.body
    assert all(p.requires_grad for p in model.parameters())
    norms = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_mask_head_depth_and_width_follow_the_config():
    model = build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64,
                                    mask_head_convs=2, mask_head_channels=16), 4)
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 16), (16, 16)]
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 16
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 96, 128)])
    assert output["masks"].shape[1:] == (1, 96, 128)
    default = build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64), 4)
    assert sum(isinstance(m, nn.Conv2d) for m in default.roi_heads.mask_head.modules()) == 4


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(reference.conv1.weight)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(backbone="resnet18", init=str(path), fpn_channels=32, box_head_dim=64), 3)
    trunk = model.backbone.body
    assert torch.equal(trunk.conv1.weight, reference.conv1.weight)
    assert torch.equal(trunk.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert type(trunk.bn1).__name__ == "FrozenBatchNorm2d"
    assert not trunk.conv1.weight.requires_grad and trunk.layer4[0].conv1.weight.requires_grad  # 3 stages train


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not fit resnet50"):
        build_model(ModelConfig(backbone="resnet50", init=str(path)), 3)


def test_imagenet_without_network_fails_at_once_with_instructions(tmp_path, monkeypatch):
    import torchvision.models._api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision's weights API holds its own reference to torch.hub.load_state_dict_from_url; patching
    # torch.hub alone would leave a machine with network downloading. The hub folder is put back after.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(BackboneWeightsError) as error:
        build_model(ModelConfig(backbone="resnet50", init="imagenet"), 3)
    message = str(error.value)
    assert str(weights_module.cached_weights_path("resnet50")) in message
    assert "model.init=none" in message and "download.pytorch.org" in message


@pytest.mark.parametrize("backbone", ["resnet50", "resnext50_32x4d"])
def test_bottleneck_backbones_build(backbone):
    model = build_model(ModelConfig(backbone=backbone, init="none"), 21)
    model.eval()
    with torch.no_grad():
        output = model([torch.rand(3, 64, 80)])[0]
    assert set(output) == {"boxes", "labels", "scores", "masks"}


def test_frozen_batchnorm_keeps_low_precision_and_torchvision_values():
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

    from tinyseg.model.backbones import FrozenBatchNorm2d

    ours, theirs = FrozenBatchNorm2d(8), TorchvisionFrozenBN(8)
    for name, buffer in theirs.named_buffers():
        buffer.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert theirs(x.bfloat16()).dtype == torch.float32  # promoted: the cost this class removes
    low = ours(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), theirs(x), rtol=2e-2, atol=2e-2)
