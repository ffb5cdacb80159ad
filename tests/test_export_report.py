"""ONNX export agrees with PyTorch; the run report renders in headless Chromium."""

import json
import re
from collections import Counter
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinyseg.data.images import load_rgb
from tinyseg.inference.predictor import binary_masks, load_model
from tinyseg.runtime.checkpoint import CheckpointError
from torchvision.ops import box_iou

from conftest import SHARED, run_cli


@pytest.fixture(scope="module")
def onnx_path(trained_run, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--format", "onnx", "--output", str(out))
    return out


def _masks(output: dict, image: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool at 0.5: torchvision's full-size masks, or an export's mask_probs pasted into their boxes."""
    return torch.from_numpy(binary_masks(output, 0.5, tuple(image.shape[-2:]))).permute(2, 0, 1).bool()


def _images(trained_run):
    shapes = trained_run["shapes"]
    paths = [shapes["images"] / i["file_name"] for i in json.loads(shapes["test"].read_text())["images"]]
    real = SHARED / "tinyvoc" / "test_images"
    if real.exists():  # real photos of other sizes, when ../shared is there
        paths += sorted(real.glob("*.jpg"))[:3]
    return paths


def test_onnx_matches_pytorch(trained_run, onnx_path):
    from tinyseg.inference.export import OnnxModel

    threshold = 0.3
    torch_model = load_model(str(trained_run["run_dir"] / "best.pt"), device="cpu", amp="none").model
    onnx_model = OnnxModel(str(onnx_path))
    compared = 0
    for path in _images(trained_run):
        image = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            reference = torch_model([image])[0]
        exported = onnx_model(image)
        keep_r, keep_e = reference["scores"] >= threshold, exported["scores"] >= threshold
        assert int(keep_r.sum()) == int(keep_e.sum()), path
        assert torch.equal(reference["labels"][keep_r], exported["labels"][keep_e])
        if keep_r.any():
            ious = box_iou(reference["boxes"][keep_r], exported["boxes"][keep_e]).diagonal()
            assert float(ious.min()) > 0.99
            for ma, mb in zip(_masks(reference, image)[keep_r], _masks(exported, image)[keep_e]):
                union = (ma | mb).sum()
                assert union == 0 or (ma & mb).sum() / union > 0.98
            compared += int(keep_r.sum())
    assert compared > 0, "no detections above the threshold: the comparison would prove nothing"


def test_default_export_leaves_the_paste_out_of_the_graph_and_pasted_masks_agree(trained_run, onnx_path, tmp_path):
    import onnx
    from tinyseg.inference.export import OnnxModel

    graph = onnx.load(str(onnx_path)).graph
    assert [o.name for o in graph.output] == ["boxes", "labels", "scores", "mask_probs"]
    ops = {node.op_type for node in graph.node}
    assert "Loop" not in ops  # the per-detection paste (its cost: benchmarks/README.md)
    assert "ScatterElements" not in ops  # torchvision's element-wise merge of RoIAlign levels
    pasted = tmp_path / "pasted.onnx"
    run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--output", str(pasted), "--pasted-masks")
    assert [o.name for o in onnx.load(str(pasted)).graph.output][-1] == "masks"
    small, full = OnnxModel(str(onnx_path)), OnnxModel(str(pasted))
    compared = 0
    for path in _images(trained_run)[:3]:
        image = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).float() / 255
        a, b = small(image), full(image)
        assert a["mask_probs"].shape[1:] == (1, 28, 28) and b["masks"].shape[2:] == image.shape[1:]
        torch.testing.assert_close(a["boxes"], b["boxes"])
        # tinyseg's paste gives the graph's pixels (inference/masks.py resizes as torchvision does)
        ma, mb = _masks(a, image), _masks(b, image)
        assert ma.shape == mb.shape
        assert (ma != mb).float().mean() < 1e-3
        compared += len(ma)
        # both give the same COCO results (the masks' pixels are compared above)
        entries = [small.results(image, 1), full.results(image, 1)]
        assert [(e["category_id"], e["bbox"]) for e in entries[0]] == [(e["category_id"], e["bbox"]) for e in entries[1]]
    # an export from before the tinyseg_masks key (it pasted in the graph) is read as such
    old = onnx.load(str(pasted))
    kept = [entry for entry in old.metadata_props if entry.key != "tinyseg_masks"]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert OnnxModel(str(tmp_path / "old.onnx")).results(image, 1) == full.results(image, 1)
    assert compared > 0
    # a mask output this tinyseg does not know is refused, not read as one it knows
    old.metadata_props.add(key="tinyseg_masks", value="mask_logits")
    onnx.save(old, str(tmp_path / "newer.onnx"))
    with pytest.raises(CheckpointError, match="unknown mask output 'mask_logits'"):
        OnnxModel(str(tmp_path / "newer.onnx"))


def test_gn_roi_heads_export_runs_on_an_image_without_detections(tmp_path):
    """A GroupNorm mask head meets zero RoIs when nothing is detected; onnxruntime failed to size its reshape."""
    import onnxruntime
    from tinyseg.config import ModelConfig
    from tinyseg.model import build_model

    head = build_model(ModelConfig(backbone="resnet18", init="none", norm="gn", fpn_channels=32, box_head_dim=64),
                       4).roi_heads.mask_head.eval()
    path, rois = tmp_path / "head.onnx", torch.rand(3, 32, 14, 14)
    torch.onnx.export(head, (rois,), str(path), input_names=["rois"], output_names=["out"], dynamo=False,
                      dynamic_axes={"rois": [0], "out": [0]})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"rois": rois.numpy()})[0], head(rois).numpy(), atol=1e-4)
    assert session.run(None, {"rois": np.zeros((0, 32, 14, 14), np.float32)})[0].shape[0] == 0


def test_an_image_without_detections_gives_none_in_both_runtimes(trained_run, tmp_path, monkeypatch):
    """Nothing can pass a score threshold above 1: onnxruntime gave no rows, OpenVINO one row of garbage
    (torchvision's batched_nms branch for no boxes, traced as an ONNX If)."""
    pytest.importorskip("openvino")
    import tinyseg.inference.export as export_module

    def nothing_passes(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded.model.roi_heads.score_thresh = 1.1
        return loaded

    monkeypatch.setattr(export_module, "load_model", nothing_passes)
    path = export_module.export(str(trained_run["run_dir"] / "best.pt"), str(tmp_path / "none.onnx"))
    image = torch.from_numpy(np.asarray(load_rgb(_images(trained_run)[0])).copy()).permute(2, 0, 1).float() / 255
    for runtime in ("onnxruntime", "openvino"):
        model = export_module.OnnxModel(str(path), runtime=runtime)
        assert {name: tuple(v.shape)[0] for name, v in model(image).items()} == dict.fromkeys(model.outputs, 0)
        assert model.results(image, 1) == []


def _predict_writes_a_valid_submission(trained_run, model_path, out) -> None:
    shapes = trained_run["shapes"]
    run_cli("predict", "--onnx", str(model_path), "--image-dir", str(shapes["images"]), "--images-json",
            str(shapes["test"]), "--output", str(out))
    run_cli("validate-submission", str(out), "--images-json", str(shapes["test"]))
    assert {e["category_id"] for e in json.loads(out.read_text())} <= {3, 7, 12}


def test_predict_with_onnx_writes_a_valid_submission(trained_run, onnx_path, tmp_path):
    _predict_writes_a_valid_submission(trained_run, onnx_path, tmp_path / "onnx_submission.json")
    shapes, capped = trained_run["shapes"], tmp_path / "capped.json"  # --max-detections was ignored with --onnx
    run_cli("predict", "--onnx", str(onnx_path), "--image-dir", str(shapes["images"]), "--images-json",
            str(shapes["test"]), "--output", str(capped), "--max-detections", "1", "--score-thresh", "0")
    per_image = Counter(entry["image_id"] for entry in json.loads(capped.read_text()))
    assert per_image and max(per_image.values()) == 1


def _assert_same_detections(reference, candidate, paths) -> None:
    compared = 0
    for path in paths:  # several image sizes: one compiled model each under OpenVINO
        image = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).float() / 255
        a, b = reference(image), candidate(image)
        keep_a, keep_b = a["scores"] >= 0.3, b["scores"] >= 0.3
        assert int(keep_a.sum()) == int(keep_b.sum()), path
        assert torch.equal(a["labels"][keep_a], b["labels"][keep_b])
        if keep_a.any():
            assert float(box_iou(a["boxes"][keep_a], b["boxes"][keep_b]).diagonal().min()) > 0.99
            assert torch.allclose(a["scores"][keep_a], b["scores"][keep_b], atol=1e-3)
            for ma, mb in zip(_masks(a, image)[keep_a], _masks(b, image)[keep_b]):
                union = (ma | mb).sum()
                assert union == 0 or (ma & mb).sum() / union > 0.98
            compared += int(keep_a.sum())
    assert compared > 0, "no detections above the threshold: the comparison would prove nothing"


def test_openvino_runs_the_onnx_export_as_onnxruntime_does(trained_run, onnx_path):
    pytest.importorskip("openvino")
    from tinyseg.inference.export import OnnxModel

    _assert_same_detections(OnnxModel(str(onnx_path)), OnnxModel(str(onnx_path), runtime="openvino"),
                            _images(trained_run))


def test_openvino_ir_export_predicts_as_onnxruntime_and_keeps_the_categories(trained_run, onnx_path, tmp_path):
    pytest.importorskip("openvino")
    from tinyseg.inference.export import OnnxModel

    xml = tmp_path / "model.xml"
    run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--format", "openvino", "--output", str(xml))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # no temporary files left
    assert xml.with_suffix(".bin").stat().st_size > 0.9 * onnx_path.stat().st_size  # fp32 weights, not halved
    ir, reference = OnnxModel(str(xml)), OnnxModel(str(onnx_path))
    assert type(ir.run).__name__ == "_OpenVino"  # the IR picks its runtime by itself
    assert ir.categories.to_dict() == reference.categories.to_dict() and ir.mask_thresh == reference.mask_thresh
    _assert_same_detections(reference, ir, _images(trained_run)[:2])

    _predict_writes_a_valid_submission(trained_run, xml, tmp_path / "ir_submission.json")
    shapes = trained_run["shapes"]
    result = run_cli("predict", "--onnx", str(xml), "--runtime", "onnxruntime", "--image-dir", str(shapes["images"]),
                     "--output", str(tmp_path / "x.json"), check=False)
    assert result.returncode == 2 and "runs with runtime openvino" in result.stderr


def test_int8_export_is_quantized_keeps_the_categories_and_predicts(trained_run, onnx_path, tmp_path, caplog):
    import onnx
    from tinyseg.inference.export import OnnxModel

    shapes, out = trained_run["shapes"], tmp_path / "int8.onnx"
    run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--output", str(out), "--int8-calibration",
            str(shapes["images"]), "--int8-images", "4")
    # onnxruntime's advice to pre-process, printed twice: measured to change nothing on this export
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # no temporary files left
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert out.stat().st_size < 0.5 * onnx_path.stat().st_size  # int8 weights: about a quarter
    int8, fp32 = OnnxModel(str(out)), OnnxModel(str(onnx_path))
    assert int8.categories.to_dict() == fp32.categories.to_dict()
    matched, total, mask_ious = 0, 0, []
    for path in _images(trained_run)[:4]:
        image = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1).float() / 255
        a, b = fp32(image), int8(image)
        keep_a, keep_b = a["scores"] >= 0.3, b["scores"] >= 0.3
        total += int(keep_a.sum())
        if keep_a.any() and keep_b.any():
            ious = box_iou(a["boxes"][keep_a], b["boxes"][keep_b])
            ious[a["labels"][keep_a][:, None] != b["labels"][keep_b][None, :]] = 0
            best, partner = ious.max(dim=1)
            matched += int((best > 0.7).sum())
            masks_a, masks_b = _masks(a, image)[keep_a], _masks(b, image)[keep_b]
            for i in torch.nonzero(best > 0.7).flatten():  # the masks of matched detections, not only the boxes
                ma, mb = masks_a[i], masks_b[partner[i]]
                mask_ious.append(float((ma & mb).sum() / (ma | mb).sum().clamp(min=1)))
    assert total > 0 and matched >= 0.5 * total, (matched, total)  # a broken calibration finds nothing
    assert np.median(mask_ious) > 0.8, mask_ious  # a broken mask head would draw nothing

    result = run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--format", "openvino", "--output",
                     str(tmp_path / "m.xml"), "--int8-calibration", str(shapes["images"]), check=False)
    assert result.returncode == 2 and "format onnx" in result.stderr
    result = run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--output", str(tmp_path / "m.onnx"),
                     "--int8-calibration", str(shapes["images"]), "--int8-images", "0", check=False)
    assert result.returncode == 2 and "at least 1 calibration image" in result.stderr and not (tmp_path / "m.onnx").exists()
    result = run_cli("export", str(trained_run["run_dir"] / "best.pt"), "--output", str(tmp_path / "m.onnx"),
                     "--int8-calibration", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 1 and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_predict_with_a_missing_runtime_says_what_to_install(trained_run, onnx_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    shapes = trained_run["shapes"]
    result = run_cli("predict", "--onnx", str(onnx_path), "--runtime", "openvino", "--image-dir",
                     str(shapes["images"]), "--output", str(tmp_path / "sub.json"), check=False)
    assert result.returncode == 2 and "pip install openvino" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "sub.json").exists()


def test_report_files_exist(trained_run):
    run_dir = trained_run["run_dir"]
    for name in ("losses.png", "ap.png", "per_class_ap50.png", "pr_curves.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000, name
    assert list((run_dir / "plots").glob("worst_*.png"))
    page = (run_dir / "report.html").read_text()
    assert page.count("<img ") >= 5 and "Average Precision" in page


CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.insertAdjacentHTML('beforeend', `<div id="tinyseg-check">images=${images.length} broken=${broken}</div>`);
});
</script>"""


def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000"]
    page = trained_run["run_dir"] / "report.html"
    shot = tmp_path / "report.png"
    result = subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert not re.search(r"CONSOLE.*(Error|Uncaught)|Uncaught", result.stderr), result.stderr[-2000:]
    # A copy with a checking script (the report itself has none) tells whether every image decoded.
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run(flags + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"images=(\d+) broken=(\d+)", dom)
    assert found and int(found.group(1)) >= 5 and found.group(2) == "0", dom[-500:]
