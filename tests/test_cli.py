"""The CLI end to end, as a user runs it."""

import json
from collections import Counter

import pytest
from conftest import TINY, run_cli

from tinyseg.commands import describe
from tinyseg.inference.export import ExportOptionError, check_options, export


def test_train_predict_validate_evaluate_visualize(shapes, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--config", "demo", "--train-json", str(shapes["train"]), "--image-dir", str(shapes["images"]),
            "--val-json", str(shapes["val"]), "--output-dir", str(run), *TINY, "solver.epochs=2")
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    assert "resnet18" in (run / "config.yaml").read_text()

    submission = tmp_path / "submission.json"
    run_cli("predict", "--checkpoint", str(run / "best.pt"), "--image-dir", str(shapes["images"]),
            "--images-json", str(shapes["test"]), "--output", str(submission), "--workers", "0")
    # a real `python -m tinyseg` once: the entry point itself (the other calls run in this process)
    result = run_cli("validate-submission", str(submission), "--images-json", str(shapes["test"]), process=True)
    assert "valid" in result.stdout and "not checked" not in result.stdout
    images_only = tmp_path / "images_only.json"  # a "valid" here said nothing of the category ids it could not check
    images_only.write_text(json.dumps({"images": json.loads(shapes["test"].read_text())["images"]}))
    result = run_cli("validate-submission", str(submission), "--images-json", str(images_only))
    assert f"valid ({len(json.loads(submission.read_text()))} detections); category ids not checked" in result.stdout

    metrics = tmp_path / "metrics.json"
    result = run_cli("evaluate", "--gt", str(shapes["test_gt"]), "--detections", str(submission),
                     "--output", str(metrics))
    assert "Average Precision" in result.stdout and "category" in result.stdout
    scores = json.loads(metrics.read_text())
    assert set(scores) == {"segm", "bbox"} and len(scores["segm"]["summary"]) == 12

    overlays = tmp_path / "overlays"
    run_cli("visualize", "--image-dir", str(shapes["images"]), "--images-json", str(shapes["test"]),
            "--detections", str(submission), "--output-dir", str(overlays), "--num", "3", "--score-thresh", "0")
    assert len(list(overlays.glob("*.png"))) == 3


def test_bad_inputs_give_one_clear_line(shapes, trained_run, tmp_path):
    bad = tmp_path / "bad.json"
    data = json.loads(shapes["train"].read_text())
    data["annotations"][0]["category_id"] = 99
    bad.write_text(json.dumps(data))
    # through the real entry point (`python -m tinyseg`): its exit code and stderr, not only main()'s
    result = run_cli("train", "--config", "demo", "--train-json", str(bad), "--image-dir", str(shapes["images"]),
                     "--output-dir", str(tmp_path / "run"), check=False, process=True)
    assert result.returncode == 1  # bad data: 1; a bad command line or config: 2
    assert "unknown category_id 99" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("train", "--config", "demo", "solver.lrr=1", check=False)
    assert result.returncode == 2 and "did you mean 'lr'" in result.stderr

    result = run_cli("predict", "--checkpoint", str(tmp_path / "none.pt"), "--image-dir", str(shapes["images"]),
                     "--output", str(tmp_path / "x.json"), "--device", "tpu9", check=False)
    assert result.returncode == 2 and "device 'tpu9' is not a device name" in result.stderr

    # a runtime is for exported models; a checkpoint would silently be run by PyTorch instead
    result = run_cli("predict", "--checkpoint", str(tmp_path / "none.pt"), "--image-dir", str(shapes["images"]),
                     "--output", str(tmp_path / "x.json"), "--runtime", "openvino", check=False)
    assert result.returncode == 2 and "tinyseg export" in result.stderr and "--onnx" in result.stderr

    # export options are refused before the checkpoint is read (none.pt does not exist), by the CLI and the library
    for options, message in ((["--format", "openvino", "--output", str(tmp_path / "m.onnx")], "NAME.xml"),
                             (["--format", "openvino", "--int8-calibration", str(shapes["images"])], "format onnx"),
                             (["--int8-calibration", str(shapes["images"]), "--int8-images", "0"], "at least 1"),
                             (["--opset", "9"], "opset must be 11 to 20")):  # it was the exporter's long traceback
        result = run_cli("export", str(tmp_path / "none.pt"), *options, check=False)
        assert result.returncode == 2 and message in result.stderr and "none.pt" not in result.stderr, result.stderr
    with pytest.raises(ExportOptionError, match="NAME.xml"):
        export(str(tmp_path / "none.pt"), str(tmp_path / "m.onnx"), "openvino")
    with pytest.raises(ExportOptionError, match="at least 1"):
        export(str(tmp_path / "none.pt"), str(tmp_path / "m.onnx"), int8_calibration=[])
    check_options(str(tmp_path / "M.XML"), "openvino")  # the suffix in any case, as the CLI takes it

    # an exported model that is missing, or not a model, is named in one line (it was onnxruntime's traceback)
    not_a_model = tmp_path / "notes.onnx"
    not_a_model.write_text("not a model")
    for model, runtime, message in ((tmp_path / "none.onnx", "onnxruntime", "exported model not found"),
                                    (not_a_model, "onnxruntime", "onnxruntime cannot read it"),
                                    (not_a_model, "openvino", "openvino cannot read it")):
        result = run_cli("predict", "--onnx", str(model), "--runtime", runtime, "--image-dir", str(shapes["images"]),
                         "--output", str(tmp_path / "x.json"), check=False, process=True)
        assert result.returncode == 2 and f"{model}: {message}" in result.stderr, result.stderr  # as a missing checkpoint
        assert "Traceback" not in result.stderr

    # an export given where a checkpoint belongs (torch.load called it pickled code), a missing image folder
    result = run_cli("predict", "--checkpoint", str(not_a_model), "--image-dir", str(shapes["images"]),
                     "--output", str(tmp_path / "x.json"), check=False)
    assert result.returncode == 2 and "an exported model, not a checkpoint" in result.stderr, result.stderr
    with pytest.raises(FileNotFoundError) as missing:  # as predict's image folder listing raises it
        (tmp_path / "nope").iterdir().__next__()
    assert describe(missing.value) == f"{tmp_path / 'nope'}: no such file or directory"

    for not_a_run in (tmp_path / "nope_run", not_a_model):  # an empty page was written; a file raised
        result = run_cli("report", str(not_a_run), check=False)
        assert result.returncode == 1 and f"{not_a_run}: not a run folder" in result.stderr, result.stderr
    assert not (tmp_path / "nope_run").exists()

    # a COCO file without its image folder was "image folder '' ... does not exist"
    result = run_cli("train", "--config", "demo", "--train-json", str(shapes["train"]), "--output-dir",
                     str(tmp_path / "run3"), check=False)
    assert result.returncode == 1 and "a COCO file needs its image folder (--image-dir" in result.stderr, result.stderr

    # key=value after an option: argparse's "unrecognized arguments" before; every override is applied now
    result = run_cli("train", "solver.lr=-1", "--output-dir", str(tmp_path / "run4"), "solver.epochs=0", check=False)
    assert result.returncode == 2 and "'solver.lr' must be > 0" in result.stderr, result.stderr
    assert "'solver.epochs' must be >= 1" in result.stderr and "unrecognized" not in result.stderr
    assert "unrecognized arguments: --nope" in run_cli("train", "a.b=1", "--nope", "c.d=2", check=False).stderr

    # prediction settings that gave an empty or maskless submission, or a traceback (--tta-scales 0)
    for option, message in ((["--mask-thresh", "1.5"], "'predict.mask_thresh' (--mask-thresh) must be in (0, 1)"),
                            (["--score-thresh", "2"], "(--score-thresh) must be in [0, 1], got 2.0"),
                            (["--max-detections", "0"], "(--max-detections) must be >= 1"),
                            (["--tta", "--tta-scales", "0"], "(--tta-scales) must be positive sizes")):
        for model in (["--onnx", str(not_a_model)], ["--checkpoint", str(trained_run["run_dir"] / "best.pt")]):
            if "--tta" in option and "--onnx" in model:
                continue
            result = run_cli("predict", *model, "--image-dir", str(shapes["images"]), "--output",
                             str(tmp_path / "x.json"), *option, check=False)
            assert result.returncode == 2 and message in result.stderr, result.stderr

    # options an exported model cannot honour are refused, not ignored (--tta gave the same file as without)
    for option in (["--tta"], ["--tta-scales", "640"], ["--batch-size", "4"], ["--amp", "bf16"]):
        result = run_cli("predict", "--onnx", str(not_a_model), "--image-dir", str(shapes["images"]),
                         "--output", str(tmp_path / "x.json"), *option, check=False)
        assert result.returncode == 2 and f"{option[0]}: not for an exported model" in result.stderr, result.stderr

    not_a_folder = shapes["train"]  # a file given where a folder of images belongs
    result = run_cli("train", "--config", "demo", "--train-json", str(shapes["train"]), "--output-dir",
                     str(tmp_path / "run2"), "--image-dir", str(not_a_folder), check=False)
    assert result.returncode == 1 and f"'{not_a_folder}' for {shapes['train']} is not a folder" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_check_data_reports_and_exits(shapes, tmp_path):
    result = run_cli("check-data", str(shapes["train"]), str(shapes["images"]))
    assert "usable for training" in result.stdout and "instances per class" in result.stdout
    assert "never found" not in result.stdout
    # images with more instances than prediction keeps (the densest here holds 2): told, and still usable
    data = json.loads(shapes["train"].read_text())
    assert max(Counter(a["image_id"] for a in data["annotations"]).values()) == 2
    result = run_cli("check-data", str(shapes["train"]), str(shapes["images"]), "--max-detections", "1")
    assert result.returncode == 0 and "usable for training" in result.stdout
    assert f"WARNING {shapes['train']}: annotations: " in result.stdout
    assert "hold more instances than prediction keeps (predict.max_detections=1 per image)" in result.stdout
    assert "Set predict.max_detections=50" in result.stdout  # above the densest image's count, in steps of 50
    result = run_cli("check-data", str(shapes["train"]), str(shapes["images"]), "--max-detections", "0", check=False)
    assert result.returncode == 2 and "--max-detections 0" in result.stderr and "Traceback" not in result.stderr
    data = json.loads(shapes["train"].read_text())
    data["images"][0]["file_name"] = "nope.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = run_cli("check-data", str(bad), str(shapes["images"]), check=False)
    assert result.returncode == 1 and "nope.png" in result.stdout and "not found" in result.stdout
    # No instance at all: `train` refuses it, and check-data called it usable before.
    data = json.loads(shapes["train"].read_text())
    bad.write_text(json.dumps({**data, "annotations": [{**a, "iscrowd": 1} for a in data["annotations"]]}))
    result = run_cli("check-data", str(bad), str(shapes["images"]), check=False)
    assert result.returncode == 1 and "no image has a (non-crowd) instance" in result.stdout
    assert "NOT usable" in result.stdout


def test_visualize_ground_truth_browser(shapes, tmp_path):
    run_cli("visualize", "--image-dir", str(shapes["images"]), "--gt", str(shapes["train"]),
            "--output-dir", str(tmp_path), "--num", "2")
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_check_data_catches_size_mismatch_and_bad_images(shapes, tmp_path):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(shapes["images"], folder)
    data = json.loads(shapes["train"].read_text())
    data["images"][0]["width"] += 5
    (folder / data["images"][1]["file_name"]).write_bytes(b"")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = run_cli("check-data", str(bad), str(folder), check=False)
    assert result.returncode == 1
    assert "the JSON says" in result.stdout and "empty (0 bytes)" in result.stdout


def test_evaluate_checks_interval_options_before_predicting(shapes, tmp_path, monkeypatch, capsys):
    """A bad --ci-level / --resamples is refused at once, not after a whole prediction (in process)."""
    import tinyseg.inference.jobs as run
    from tinyseg.cli import main

    def predict(*args, **kwargs):
        raise AssertionError("predicted before checking the command line")

    monkeypatch.setattr(run, "evaluate_checkpoint", predict)
    common = ["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--gt", str(shapes["test_gt"]),
              "--image-dir", str(shapes["images"])]
    for bad in (["--ci-level", "2"], ["--resamples", "-1"]):
        assert main([*common, *bad]) == 2
        assert "--ci-level in (0, 1)" in capsys.readouterr().err


def test_cli_defaults_are_the_config_defaults(monkeypatch, capsys):
    """One default per setting: the CLI reads the config's, so changing it there changes the CLI."""
    import pytest

    from tinyseg.cli import build_parser
    from tinyseg.config import DataConfig, PredictConfig

    from tinyseg.config import EvalConfig, TrainConfig

    monkeypatch.setattr(DataConfig, "max_image_pixels", 1234)
    monkeypatch.setattr(DataConfig, "num_workers", 5)
    monkeypatch.setattr(PredictConfig, "score_thresh", 0.125)
    monkeypatch.setattr(PredictConfig, "max_detections", 77)
    monkeypatch.setattr(PredictConfig, "mask_thresh", 0.375)
    monkeypatch.setattr(PredictConfig, "overlay_score_thresh", 0.625)
    monkeypatch.setattr(TrainConfig, "device", "cpu")
    monkeypatch.setattr(EvalConfig, "ci_resamples", 321)
    monkeypatch.setattr(EvalConfig, "ci_level", 0.875)
    parser = build_parser()
    assert parser.parse_args(["check-data", "x.json"]).max_image_pixels == 1234
    assert parser.parse_args(["check-data", "x.json"]).max_detections == 77
    predict = parser.parse_args(["predict", "--image-dir", "d", "--output", "o"])
    assert (predict.workers, predict.device) == (5, "cpu")
    # None keeps the run's own setting; the help says which value that is unless the run set one
    assert predict.score_thresh is None and predict.max_detections is None and predict.mask_thresh is None
    visualize = parser.parse_args(["visualize", "--image-dir", "d", "--output-dir", "o"])
    assert visualize.score_thresh == 0.625
    evaluate = parser.parse_args(["evaluate", "--gt", "g"])
    assert (evaluate.resamples, evaluate.ci_level) == (321, 0.875)
    for verb, shown in (("predict", ("0.125", "77", "0.375", "cpu")), ("visualize", ("0.625",)),
                        ("evaluate", ("321", "0.875", "0.125")), ("check-data", ("1234", "77"))):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for value in shown:
            assert value in text, f"{verb} --help does not show the config's {value}"


def test_predict_one_image_given_as_image_dir(shapes, trained_run, tmp_path):
    """`--image-dir photo.jpg` predicts that image (it was a NotADirectoryError traceback), as a folder of
    one would; a file that is not an image is one clear line."""
    checkpoint = str(trained_run["run_dir"] / "best.pt")
    image = sorted(shapes["images"].iterdir())[0]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / image.name).write_bytes(image.read_bytes())
    outputs = {}
    for name, source in (("file", image), ("folder", alone)):
        outputs[name] = tmp_path / f"{name}.json"
        run_cli("predict", "--checkpoint", checkpoint, "--image-dir", str(source), "--output", str(outputs[name]),
                "--score-thresh", "0")
    detections = json.loads(outputs["file"].read_text())
    assert detections and detections == json.loads(outputs["folder"].read_text())
    listed = json.loads(outputs["file"].with_suffix(".images.json").read_text())
    assert [(i["id"], i["file_name"]) for i in listed["images"]] == [(1, image.name)]
    result = run_cli("predict", "--checkpoint", checkpoint, "--image-dir", str(shapes["train"]), "--output",
                     str(tmp_path / "x.json"), check=False)
    assert result.returncode == 1 and "neither a folder of images nor an image" in result.stderr, result.stderr
    # with an images JSON, its images were read from the file's folder: all of them, exit 0
    result = run_cli("predict", "--checkpoint", checkpoint, "--image-dir", str(image), "--images-json",
                     str(shapes["test"]), "--output", str(tmp_path / "y.json"), check=False)
    assert result.returncode == 1 and "with an images JSON" in result.stderr, result.stderr
