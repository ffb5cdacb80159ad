"""The backbone registry: every family gives the FPN levels the detector expects, built and loaded the same way."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from tinyseg.config import ConfigError, InputConfig, ModelConfig, PredictConfig
from tinyseg.model import BACKBONES, Trunk, build_model, prepare_for_inference, register_backbone
from tinyseg.model.weights import imagenet_weights

from conftest import perturb

TINY = dict(fpn_channels=32, box_head_dim=64, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
            rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=100)
BUILT_IN = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "regnet_x_400mf", "regnet_y_400mf")
LEVELS = ["0", "1", "2", "3", "pool"]
FEW = dict(test=InputConfig(test_min_size=96, test_max_size=112), predict=PredictConfig(max_detections=10))


def test_built_in_names_are_registered_with_torchvision_imagenet_weights():
    assert set(BUILT_IN) <= set(BACKBONES)
    for name in BACKBONES:  # model.init=imagenet goes through torchvision's weights API for each
        assert imagenet_weights(name).url.startswith("https://download.pytorch.org/")


@pytest.mark.parametrize("backbone", ["resnet18", "regnet_x_400mf", "regnet_y_400mf"])
def test_small_backbones_give_every_fpn_level(backbone):
    model = build_model(ModelConfig(backbone=backbone, init="none", **TINY), 3).eval()
    # from scratch: GroupNorm throughout the trunk, whatever its widths (RegNetY-400MF has 104 and 440)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.backbone.body.modules())
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 96, 112))
    assert list(features) == LEVELS
    # strides 4, 8, 16, 32 and the max-pooled 64, as the anchors and RoI poolers assume
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(24, 28), (12, 14), (6, 7), (3, 4), (2, 2)]
    assert all(f.shape[1] == 32 for f in features.values())


def training_batch() -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    masks = torch.zeros(2, 96, 112, dtype=torch.uint8)
    masks[0, 10:50, 12:60] = 1
    masks[1, 40:90, 50:105] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 60.0, 50.0], [50.0, 40.0, 105.0, 90.0]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    return [torch.rand(3, 96, 112), torch.rand(3, 96, 112)], [target, target]


def test_regnet_from_scratch_trains_and_predicts():
    model = build_model(ModelConfig(backbone="regnet_x_400mf", init="none", **TINY), 3, **FEW)
    body = model.backbone.body
    assert any(isinstance(m, nn.GroupNorm) for m in body.modules())
    assert all(p.requires_grad for p in model.parameters())  # from scratch every stage trains
    images, targets = training_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = body.block1[0].f.a[0].weight.detach().clone()
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(body.block1[0].f.a[0].weight, before)
    model.eval()
    with torch.no_grad():
        output = model(images[:1])[0]
    assert set(output) == {"boxes", "labels", "scores", "masks"}


def regnet_file(tmp_path, name: str = "regnet_x_400mf") -> tuple[str, nn.Module]:
    """A torchvision RegNet's state dict, every tensor off its initial value (ones/zeros would pass by chance)."""
    torch.manual_seed(0)
    reference = perturb(getattr(torchvision.models, name)(weights=None))
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    return str(path), reference


def assert_trunk_is(body: nn.Module, reference: nn.Module) -> None:
    ours = body.state_dict()
    theirs = {k.removeprefix("trunk_output."): v for k, v in reference.state_dict().items()
              if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_regnet_loads_a_local_state_dict_and_freezes_from_the_stem_up(tmp_path):
    path, reference = regnet_file(tmp_path)
    model = build_model(ModelConfig(backbone="regnet_x_400mf", init=path, **TINY), 3)
    body = model.backbone.body
    assert_trunk_is(body, reference)
    assert type(body.stem[1]).__name__ == "FrozenBatchNorm2d"
    # model.trainable_layers=3: block4, block3, block2 train; block1 and the stem stay frozen
    frozen = {name.split(".")[0] for name, p in body.named_parameters() if not p.requires_grad}
    trained = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "block1"} and trained == {"block2", "block3", "block4"}


def test_regnet_imagenet_init_goes_through_torchvision_weights(tmp_path, monkeypatch):
    import torchvision.models._api

    path, reference = regnet_file(tmp_path, "regnet_y_400mf")
    urls = []

    def cached(url, *args, **kwargs):  # what torchvision would download
        urls.append(url)
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", cached)
    model = build_model(ModelConfig(backbone="regnet_y_400mf", init="imagenet", **TINY), 3)
    assert urls == [imagenet_weights("regnet_y_400mf").url]
    assert_trunk_is(model.backbone.body, reference)


def test_regnet_trunk_of_a_tinyseg_model_loads_back(tmp_path):
    path, _ = regnet_file(tmp_path)
    trained = build_model(ModelConfig(backbone="regnet_x_400mf", init=path, **TINY), 3)
    saved = tmp_path / "tinyseg_regnet.pth"
    torch.save(trained.state_dict(), saved)  # keys backbone.body.block1...: the trunk's own, not torchvision's
    model = build_model(ModelConfig(backbone="regnet_x_400mf", init=str(saved), **TINY), 3)
    for key, value in trained.backbone.body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[key], value), key


@pytest.mark.parametrize("channels_last", [False, True])
def test_regnet_frozen_batchnorm_folds_with_the_same_features(tmp_path, channels_last):
    path, _ = regnet_file(tmp_path, "regnet_y_400mf")
    model = build_model(ModelConfig(backbone="regnet_y_400mf", init=path, **TINY), 3).eval()
    image = torch.rand(1, 3, 96, 112)
    with torch.no_grad():
        before = model.backbone(image)
        prepare_for_inference(model, None, channels_last)
        after = model.backbone(image)
    assert model.backbone.channels_last == channels_last
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())  # conv->bn order held
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-4)


@pytest.fixture
def tiny_family():
    """A family of 4 conv stages, registered as a user's own file would, and unregistered after."""

    def stage(inputs: int, outputs: int, norm_layer) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, bias=False), norm_layer(outputs),
                             nn.ReLU(inplace=True))

    @register_backbone("my_tiny")
    def my_tiny(name: str, norm_layer) -> Trunk:
        module = nn.Sequential(OrderedDict(stem=stage(3, 8, norm_layer), stage1=stage(8, 8, norm_layer),
                                           stage2=stage(8, 16, norm_layer), stage3=stage(16, 16, norm_layer),
                                           stage4=stage(16, 24, norm_layer)))
        return Trunk(module, levels=("stage1", "stage2", "stage3", "stage4"), channels=(8, 16, 16, 24),
                     stages=(("stage4",), ("stage3",), ("stage2",), ("stage1",), ("stem",)))

    yield my_tiny
    BACKBONES.pop("my_tiny")


def test_a_new_family_builds_a_detector_through_the_registry(tiny_family, tmp_path):
    model = build_model(ModelConfig(backbone="my_tiny", init="none", **TINY), 3, **FEW).eval()
    assert model.backbone.body.stage4[0].out_channels == 24
    with torch.no_grad():
        assert list(model.backbone(torch.rand(1, 3, 96, 112))) == LEVELS
        assert set(model([torch.rand(3, 96, 112)])[0]) == {"boxes", "labels", "scores", "masks"}
    # file init and model.trainable_layers work for it as for the built-in families
    path = tmp_path / "my_tiny.pth"
    torch.save(model.backbone.body.state_dict(), path)
    pretrained = build_model(ModelConfig(backbone="my_tiny", init=str(path), trainable_layers=2, **TINY), 3)
    trained = {name.split(".")[0] for name, p in pretrained.backbone.body.named_parameters() if p.requires_grad}
    assert trained == {"stage3", "stage4"}
    with pytest.raises(ValueError, match="registered already"):
        register_backbone("my_tiny")(tiny_family)


def test_unknown_backbone_is_refused_with_the_registered_names():
    # the default model.init=imagenet: refused before any weights are looked for
    with pytest.raises(ConfigError, match="model.backbone 'resnet51' is not one of") as error:
        build_model(ModelConfig(backbone="resnet51"), 3)
    assert all(name in str(error.value) for name in BUILT_IN)


def test_resnet_checkpoint_keys_are_unchanged():
    model = build_model(ModelConfig(backbone="resnet18", init="none", **TINY), 3)
    keys = set(model.state_dict())
    for key in ("backbone.body.conv1.weight", "backbone.body.bn1.weight", "backbone.body.layer1.0.conv1.weight",
                "backbone.body.layer4.1.bn2.bias", "backbone.fpn.inner_blocks.0.0.weight",
                "backbone.fpn.inner_blocks.0.1.weight", "backbone.fpn.layer_blocks.3.0.weight"):
        assert key in keys, key
    assert not any(key.startswith("backbone.body.fc.") for key in keys)
    assert sum(key.startswith("backbone.body.") for key in keys) == 60
