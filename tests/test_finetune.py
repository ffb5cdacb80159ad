"""Fine-tuning from torchvision's COCO Mask R-CNN, checked offline with randomly valued torchvision models."""

import json
import logging
import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from tinyseg.config import ConfigError, ModelConfig, load_config
from tinyseg.model import BackboneWeightsError, build_model
from tinyseg.model.weights import CLASS_SPECIFIC, detector_layout, read_init_weights

from conftest import perturb, tiny_config

BUILDERS = {"maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn, "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2}
COCO_V1_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"  # torchvision's name for MaskRCNN_ResNet50_FPN_Weights.COCO_V1


def torchvision_detector(arch: str) -> nn.Module:
    """torchvision's detector for COCO's 91 classes with every tensor moved off its initial value.

    Fresh BatchNorm is all ones and zeros and many biases start at zero: a loader that skipped them
    would still pass an equality check, so everything gets a random offset.
    """
    torch.manual_seed(0)
    return perturb(BUILDERS[arch](weights=None, weights_backbone=None, num_classes=91))


def old_key_names(state: dict) -> dict:
    """The names older torchvision releases wrote (RPN `conv`, mask head `mask_fcnN`, FPN `inner_blocks.N`),
    as in the COCO_V1 file."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
            for blocks in ("inner_blocks", "layer_blocks"):
                key = key.replace(f"backbone.fpn.{blocks}.{i}.0.", f"backbone.fpn.{blocks}.{i}.")
        renamed[key] = value
    return renamed


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    files = {}
    for arch in BUILDERS:
        model = torchvision_detector(arch)
        state = model.state_dict()
        if arch == "maskrcnn_resnet50_fpn":
            state = old_key_names(state)
        files[arch] = (root / f"{arch}.pth", model)
        torch.save(state, files[arch][0])
    # The same v1 file under the name torchvision downloads its COCO_V1 weights as: those need eps 0.
    (root / "hub").mkdir()
    (root / "hub" / COCO_V1_FILE).symlink_to(files["maskrcnn_resnet50_fpn"][0])
    files["coco_v1_file"] = (root / "hub" / COCO_V1_FILE, files["maskrcnn_resnet50_fpn"][1])
    return files


# A v1 file keeps eps 1e-5 (a Mask R-CNN trained with torchvision's weights=None or an ImageNet backbone
# has it) unless it is torchvision's COCO_V1 file, which torchvision loads with eps 0.
@pytest.mark.parametrize("arch, file, eps", [("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", 1e-5),
                                             ("maskrcnn_resnet50_fpn", "coco_v1_file", 0.0),
                                             ("maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2", 1e-5)])
def test_detector_file_loads_every_tensor_but_the_class_specific(arch, file, eps, detector_files, caplog):
    path, reference = detector_files[file]
    config = ModelConfig(init=str(path))
    with caplog.at_level(logging.INFO, logger="tinyseg"):
        model = build_model(config, 4)  # 3 classes + background
    assert config.arch == arch  # resolved from the file, and recorded for rebuilding from a checkpoint
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(theirs) - set(ours) == {k for k in theirs if k.endswith("num_batches_tracked")}
    class_specific = [k for k in ours if k.startswith(CLASS_SPECIFIC)]
    assert len(class_specific) == 6
    for key, value in ours.items():
        if key in class_specific:
            assert value.shape[0] in (4, 16) and theirs[key].shape[0] in (91, 364)
        else:
            assert torch.equal(value, theirs[key]), key
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    loaded = len(ours) - len(class_specific)
    assert f"loaded {loaded} tensors" in caplog.text and "re-initialised 6 class-specific tensors" in caplog.text
    trunk = model.backbone.body
    assert not trunk.conv1.weight.requires_grad and not trunk.layer1[0].conv1.weight.requires_grad
    assert trunk.layer2[0].conv1.weight.requires_grad  # model.trainable_layers=3: the stem stays frozen
    assert type(trunk.bn1).__name__ == "FrozenBatchNorm2d"
    assert f"frozen BatchNorm eps {eps:g}" in caplog.text
    assert_computes_what_torchvision_does(model.eval(), reference.eval(), eps)


def assert_computes_what_torchvision_does(model: nn.Module, reference: nn.Module, trunk_eps: float) -> None:
    """Same tensors in the same places, and also the same layers around them (norm order, activations, eps)."""
    ours = dict(model.named_modules())
    norms = [(name, module) for name, module in reference.named_modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms
    for name, module in norms:
        # torchvision's overwrite_eps(model, 0.0) for COCO_V1 reaches the trunk's frozen norms, v1's only ones.
        module.eps = trunk_eps if name.startswith("backbone.body.") else 1e-5
        assert ours[name].eps == module.eps, name  # an eps off by 1e-5 is below assert_same's tolerance
    image = torch.rand(1, 3, 96, 128)
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 70.0], [30.0, 10.0, 120.0, 90.0]])]
    with torch.no_grad():
        ours, theirs = model.backbone(image), reference.backbone(image)
        for name in theirs:
            assert_same(ours[name], theirs[name])
        features = list(theirs.values())
        for mine, torchvisions in zip(model.rpn.head(features), reference.rpn.head(features)):
            for a, b in zip(mine, torchvisions):
                assert_same(a, b)
        for pool, head in (("box_roi_pool", "box_head"), ("mask_roi_pool", "mask_head")):
            pooled = getattr(reference.roi_heads, pool)(theirs, boxes, [(96, 128)])
            assert_same(getattr(model.roi_heads, head)(pooled), getattr(reference.roi_heads, head)(pooled))


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Frozen BN computes x * scale + shift, BatchNorm (x - mean) / std * w + b: equal up to rounding,
    # which 50 layers of random weights grow in proportion to the activations (up to a few hundred here).
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


def test_finetune_from_a_detector_file_trains_and_predicts_without_the_file(shapes, tmp_path, detector_files,
                                                                             monkeypatch):
    from tinyseg import Predictor
    from tinyseg.runtime.checkpoint import load_checkpoint
    from tinyseg.training.trainer import Trainer, train

    monkeypatch.setattr(Trainer, "_write_report", lambda self: None)  # plots cost seconds; tested elsewhere

    source, reference = detector_files["maskrcnn_resnet50_fpn"]
    init = tmp_path / "coco.pth"
    init.write_bytes(source.read_bytes())
    val = json.loads(shapes["val"].read_text())  # one validation image: R50 at every step costs seconds here
    val["images"] = val["images"][:1]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] == val["images"][0]["id"]]
    (tmp_path / "val1.json").write_text(json.dumps(val))
    run = tmp_path / "run"
    config = tiny_config(shapes, run, "model.backbone=resnet50", f"model.init={init}", "model.fpn_channels=256",
                         "model.box_head_dim=1024", "model.trainable_layers=3", "solver.max_iters=2",
                         "solver.batch_size=1", "solver.warmup_iters=1", "train.eval_every=0",
                         # plain SGD: no optimizer state for R50's 40M trainable weights in each checkpoint
                         "solver.optimizer=sgd", "solver.momentum=0", "solver.lr=0.001",
                         # R50's mask head costs 0.5 GFLOP per box: few boxes in training and evaluation
                         "model.box_batch_size_per_image=16", "predict.max_detections=5",
                         f"data.val_json={tmp_path / 'val1.json'}")
    assert train(config)["iterations"] == 2
    state = load_checkpoint(str(run / "last.pt"))
    assert state["config"]["model"]["arch"] == "maskrcnn_resnet50_fpn"
    original = reference.state_dict()
    # The stem is frozen (still the file's weights); the heads trained.
    assert torch.equal(state["model"]["backbone.body.conv1.weight"], original["backbone.body.conv1.weight"])
    assert not torch.equal(state["model"]["roi_heads.box_head.fc6.weight"], original["roi_heads.box_head.fc6.weight"])
    init.unlink()  # prediction rebuilds the layout from the checkpoint's config alone
    predictor = Predictor(run / "last.pt", device="cpu", score_thresh=0.0, max_detections=5)
    image = shapes["images"] / val["images"][0]["file_name"]
    found = predictor(image)  # random weights, two steps: what it finds is noise, but it finds something
    assert found and all(i.category_id in (3, 7, 12) and i.mask.shape == (96, 112) for i in found)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty hub cache, both put back afterwards."""
    import torchvision.models._api

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision's weights API holds its own reference to torch.hub.load_state_dict_from_url.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("init, name", [("coco", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
                                        ("coco-v2", "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")])
def test_coco_without_network_fails_at_once_with_instructions(init, name, offline):
    with pytest.raises(BackboneWeightsError) as error:
        build_model(ModelConfig(init=init), 3)
    message = str(error.value)
    assert "no network" in message and f"https://download.pytorch.org/models/{name}" in message
    assert str(offline / "checkpoints" / name) in message
    assert f"model.init=/path/to/{name}" in message and "model.init=imagenet" in message


def test_tinyvoc_refuses_detector_weights_unless_overridden(offline, detector_files):
    for init in ("coco", "coco-v2", str(detector_files["maskrcnn_resnet50_fpn_v2"][0])):
        config = load_config("tinyvoc", [f"model.init={init}", "model.backbone=resnet50"])
        with pytest.raises(ConfigError, match="allow_detector_init=false .*ImageNet-pretrained backbones only"):
            build_model(config.model, 21)
    allowed = load_config("tinyvoc", ["model.init=coco", "model.backbone=resnet50", "model.allow_detector_init=true"])
    with pytest.raises(BackboneWeightsError, match="no network"):  # refusal lifted: it goes on to download
        build_model(allowed.model, 21)
    assert load_config("finetune").model.init == "coco"
    with pytest.raises(BackboneWeightsError, match="no network"):  # the width COCO's mask head has: accepted
        build_model(ModelConfig(init="coco", mask_head_channels=256), 21)


@pytest.mark.parametrize("override, message", [
    ({"backbone": "resnet101"}, "needs model.backbone=resnet50"),
    ({"fpn_channels": 128}, "needs model.fpn_channels=256"),
    ({"mask_head_convs": 2}, "needs model.mask_head_convs=4"),
    ({"mask_head_channels": 64}, "needs model.mask_head_channels=256"),
    ({"norm": "gn"}, "model.norm must be auto or one of"),
])
def test_settings_that_do_not_fit_coco_weights_are_refused_before_download(override, message, offline):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(init="coco", **override), 3)


def test_checkpoint_rebuild_reads_no_weights_and_keeps_the_pretrained_norm(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    config = ModelConfig(backbone="resnet18", init=str(path), fpn_channels=32, box_head_dim=64)
    trained = build_model(config, 3)
    path.unlink()
    rebuilt = build_model(config, 3, load_weights=False)
    rebuilt.load_state_dict(trained.state_dict())  # frozen BN as trained, not the from-scratch GroupNorm


def test_a_tinyseg_checkpoint_gives_its_trunk_and_is_no_coco_detector(tmp_path, caplog):
    """tinyseg with frozen BatchNorm has fc6 and no norm keys, as torchvision's v1 has: its own checkpoint
    (model.init=runs/x/best.pt) is still its trunk only, for any backbone, and allowed where the rules
    refuse detector weights (tinyvoc)."""
    import torchvision

    from tinyseg.runtime.checkpoint import save_checkpoint

    trunk_file = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), trunk_file)
    small = {"backbone": "resnet18", "fpn_channels": 32, "box_head_dim": 64}
    trained = build_model(ModelConfig(init=str(trunk_file), **small), 3).state_dict()
    assert "roi_heads.box_head.fc6.weight" in trained and not any(".fpn.inner_blocks.0.1." in k for k in trained)
    assert detector_layout(trained) is None  # a ResNet-18 is no torchvision Mask R-CNN, whatever its heads
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, {"model": trained, "ema": ema, "config": {}})
    assert read_init_weights(str(checkpoint), "resnet18").detector is None
    overrides = [f"model.init={checkpoint}", *(f"model.{k}={v}" for k, v in small.items())]
    for preset in (None, "tinyvoc"):
        config = load_config(preset, overrides)
        with caplog.at_level(logging.INFO, logger="tinyseg"):
            model = build_model(config.model, 3)
        assert config.model.arch == "tinyseg"
        ours = model.state_dict()
        trunk = [k for k in trained if k.startswith("backbone.body.")]
        assert trunk and all(torch.equal(ours[k], ema[k]) for k in trunk), "the trunk of the EMA weights"
        assert not torch.equal(ours["roi_heads.box_head.fc6.weight"], ema["roi_heads.box_head.fc6.weight"])
        assert model.backbone.body.bn1.eps == 1e-5
    assert "a tinyseg checkpoint: loading the backbone trunk of its EMA weights" in caplog.text
