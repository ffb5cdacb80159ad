"""The Python API mirrors the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

import tinyseg

from conftest import run_cli


def test_predictor_accepts_paths_pil_and_arrays(trained_run):
    shapes = trained_run["shapes"]
    predictor = tinyseg.Predictor(trained_run["run_dir"] / "best.pt", device="cpu", score_thresh=0.3)
    test = json.loads(shapes["test"].read_text())
    path = shapes["images"] / test["images"][0]["file_name"]
    from_path = predictor(path)
    from_pil = predictor(Image.open(path))
    from_array = predictor(np.asarray(Image.open(path).convert("RGB")))
    assert from_path, "the trained model should find the shapes"
    assert [i.score for i in from_path] == [i.score for i in from_pil] == [i.score for i in from_array]
    first = from_path[0]
    assert first.mask.shape == (test["images"][0]["height"], test["images"][0]["width"]) and first.mask.dtype == bool
    assert first.category_id in (3, 7, 12) and first.category_name in ("circle", "square", "triangle")
    batch = predictor.predict_batch([path, path])
    # Batched images are padded together, so scores agree to float tolerance, not bit for bit.
    assert [i.score for i in batch[1]] == pytest.approx([i.score for i in from_path], abs=1e-3)


def test_evaluate_api_matches_cli_scoring(trained_run, tmp_path):
    shapes = trained_run["shapes"]
    by_checkpoint = tinyseg.evaluate(shapes["test_gt"], checkpoint=trained_run["run_dir"] / "best.pt",
                                     image_dir=shapes["images"], device="cpu")
    assert by_checkpoint["segm"]["stats"]["AP50"] > 0
    assert set(by_checkpoint["segm"]["per_class_AP50"]) == {"circle", "square", "triangle"}
    scored = tmp_path / "cli.json"
    run_cli("evaluate", "--gt", str(shapes["test_gt"]), "--checkpoint", str(trained_run["run_dir"] / "best.pt"),
            "--image-dir", str(shapes["images"]), "--device", "cpu", "--output", str(scored))
    by_cli = json.loads(scored.read_text())
    for iou_type in ("segm", "bbox"):
        assert by_cli[iou_type]["stats"] == pytest.approx(by_checkpoint[iou_type]["stats"], abs=1e-12)


def test_tta_predictions_are_valid_and_close_to_plain(trained_run):
    shapes = trained_run["shapes"]
    test = json.loads(shapes["test"].read_text())
    path = shapes["images"] / test["images"][0]["file_name"]
    plain = tinyseg.Predictor(trained_run["run_dir"] / "best.pt", device="cpu", score_thresh=0.5)(path)
    with_tta = tinyseg.Predictor(trained_run["run_dir"] / "best.pt", device="cpu", score_thresh=0.5, tta=True)(path)
    assert with_tta and len(with_tta) <= 2 * len(plain) + 2
    best_plain, best_tta = plain[0], with_tta[0]
    overlap = (best_plain.mask & best_tta.mask).sum() / max(1, (best_plain.mask | best_tta.mask).sum())
    assert best_tta.category_id == best_plain.category_id and overlap > 0.7


def test_predictor_masks_equal_torchvision_pasting(trained_run):
    """The Predictor pastes masks straight to binary; the pixels must be torchvision's own."""
    import torch

    from tinyseg.api import _to_tensor

    shapes = trained_run["shapes"]
    test = json.loads(shapes["test"].read_text())
    path = shapes["images"] / test["images"][0]["file_name"]
    predictor = tinyseg.Predictor(trained_run["run_dir"] / "best.pt", device="cpu", score_thresh=0.3)
    found = predictor(path)
    assert found, "the trained model should find the shapes"
    with torch.no_grad():
        full = predictor.loaded.model([_to_tensor(path)])[0]  # paste_masks on: (N, 1, H, W) floats
    expected = (full["masks"][:, 0] >= predictor.loaded.config.predict.mask_thresh).numpy()
    assert np.array_equal(np.stack([instance.mask for instance in found]), expected)


def test_tta_scales_run_each_extra_scale_and_restore_the_model(trained_run):
    from tinyseg.data.dataset import ImageListDataset
    from tinyseg.inference.predictor import load_model, predict_images

    shapes = trained_run["shapes"]
    test = json.loads(shapes["test"].read_text())
    dataset = ImageListDataset([(i["id"], i["file_name"]) for i in test["images"][:1]], shapes["images"])
    heights = {}
    for scales in ([], [160]):
        loaded = load_model(str(trained_run["run_dir"] / "best.pt"), "cpu", {"tta": True, "tta_scales": scales})
        seen = []
        loaded.model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2]))
        found = predict_images(loaded.model, dataset, loaded.categories, loaded.device, 0.5, 1, progress=False,
                               tta=loaded.config.predict)
        heights[tuple(scales)] = sorted(set(seen))
        assert found.results and loaded.model.transform.min_size == (96,)
    # Flip only: every view at the test size. With a 160 px scale, a second, larger input size appears.
    assert len(heights[()]) == 1 and len(heights[(160,)]) == 2 and heights[(160,)][1] > heights[()][0]


def test_predictor_says_what_array_it_takes_and_an_empty_batch_is_empty(trained_run):
    from tinyseg import Predictor

    predictor = Predictor(trained_run["run_dir"] / "best.pt", device="cpu")
    assert predictor.predict_batch([]) == []  # it raised IndexError
    with pytest.raises(TypeError, match="uint8 array.*got float64"):  # it was PIL's "Cannot handle this data type"
        predictor(np.zeros((32, 32, 3)))
    # one path was read letter by letter ("a: file not found"); an empty array divided by zero
    with pytest.raises(TypeError, match="predict_batch takes a list of images, got one str"):
        predictor.predict_batch("photo.jpg")
    with pytest.raises(ValueError, match=r"an empty image \(0x0 pixels\)"):
        predictor(np.zeros((0, 0, 3), dtype=np.uint8))


def test_train_without_a_config_starts_from_the_default_preset_as_the_cli_does():
    """train(None) and cross_validate(None) built tinyseg.config's dataclass defaults, not `default`."""
    from tinyseg.api import _configured
    from tinyseg.cli import build_parser
    from tinyseg.commands import train_config
    from tinyseg.config import load_config

    cli = train_config(build_parser().parse_args(["train", "solver.lr=0.5"]))
    assert _configured(None, ["solver.lr=0.5"]) == cli == load_config("default", ["solver.lr=0.5"])


def test_cross_validate_resume_without_a_config_goes_on_with_the_run_s_own(tmp_path):
    """cross_validate(None, resume=True) took the default preset; `tinyseg train --folds K --resume` and
    train(None, resume=True) read the run's config.yaml."""
    from tinyseg.api import cross_validate
    from tinyseg.config import ConfigError

    with pytest.raises(ConfigError, match="config.yaml not found, so the run's settings are unknown"):
        cross_validate(None, [f"train.output_dir={tmp_path}"], folds=3, resume=True)


def test_train_applies_overrides_to_a_config_it_is_given():
    """train(Config, overrides) dropped the overrides without a word."""
    from tinyseg.api import cross_validate, train
    from tinyseg.config import Config, ConfigError

    config = Config()
    for run in (train, cross_validate):
        with pytest.raises(ConfigError, match="did you mean 'lr'"):  # read before any data
            run(config, ["solver.lrr=1"])
    assert config == Config()  # the caller's config is not changed
    # one override string was taken letter by letter ("override 's' is not of the form key=value"), a dict
    # as its keys alone: both are applied now
    from tinyseg.api import _configured

    assert _configured("demo", "solver.lr=0.5").solver.lr == 0.5
    dict_given = _configured(config, {"solver.lr": 0.5, "model.backbone": "resnet18", "input.min_size": [96, 128]})
    assert (dict_given.solver.lr, dict_given.model.backbone, dict_given.input.min_size) == (0.5, "resnet18", [96, 128])
