"""Export a checkpoint to ONNX (dynamic image size) or OpenVINO IR, and run the export with onnxruntime or OpenVINO.

(TorchScript is not offered: torch.jit.script rejects the AMP backbone's annotations, and TorchScript
is deprecated upstream; ONNX is the portable format.)

The exported graph takes one float RGB image (3, H, W) in [0, 1] and contains the resize, the
normalisation and the mapping of boxes back to the input's pixels. Its masks are, by default, the
mask head's small probability maps, "mask_probs" (N, 1, M, M), one per box, to be pasted into their
boxes as torchvision's paste_masks_in_image does (inference/masks.py here): pasting inside the graph is
a loop over detections, the larger part of onnxruntime's time (benchmarks/README.md). With pasted_masks the
graph outputs torchvision's full-size "masks" (N, 1, H, W) itself, for callers without tinyseg code. The
category map, prediction settings and mask output travel in the ONNX metadata (metadata_props), and in
an IR's runtime info under the same keys.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from ..data.coco import CategoryMap
from ..data.images import list_images
from ..runtime.checkpoint import CheckpointError
from ..runtime.files import atomic_write
from .predictor import load_model, to_coco_results

log = logging.getLogger("tinyseg")
OUTPUTS = ["boxes", "labels", "scores"]  # and "mask_probs" or, with pasted masks, "masks"
METADATA_KEYS = ("tinyseg_categories", "tinyseg_mask_thresh", "tinyseg_score_thresh", "tinyseg_masks")


def _outputs(pasted_masks: bool) -> list[str]:
    return OUTPUTS + ["masks" if pasted_masks else "mask_probs"]


FORMATS = ("onnx", "openvino")
OPSETS = (11, 20)  # the ONNX opsets this model exports at, lowest and highest


class ExportOptionError(ValueError):
    """Options that cannot make an export, found before anything is traced (the CLI's usage errors)."""


def check_options(output: str, format: str = FORMATS[0], int8: bool = False, int8_images: int = 1,
                  opset: int = 17) -> None:
    """Raise ExportOptionError for a format, output name, opset or int8 request that export() would refuse."""
    if not OPSETS[0] <= opset <= OPSETS[1]:  # torchvision's detection ops need 11; the tracing exporter stops at 20
        raise ExportOptionError(f"opset must be {OPSETS[0]} to {OPSETS[1]} for this model's export, got {opset}")
    if format not in FORMATS:
        raise ExportOptionError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "openvino" and Path(output).suffix.lower() != ".xml":
        raise ExportOptionError(f"{output}: an OpenVINO model is written as NAME.xml (its weights beside it, NAME.bin)")
    if int8 and format != "onnx":
        raise ExportOptionError("int8 quantizes an ONNX export (onnxruntime's quantizer): use format onnx"
                                " (--format onnx)")
    if int8_images < 1:
        raise ExportOptionError(f"int8 needs at least 1 calibration image, got {int8_images}")


def export(checkpoint: str, output: str, format: str = FORMATS[0], opset: int = 17,
           int8_calibration: list[Path] | None = None, pasted_masks: bool = False) -> Path:
    """ONNX, or OpenVINO IR (NAME.xml beside NAME.bin) converted from the ONNX graph; with
    int8_calibration (image paths), an ONNX file quantized to int8 on those images (quantize_int8);
    pasted_masks: full-size masks pasted in the graph instead of the small "mask_probs" (module docstring)."""
    int8 = int8_calibration is not None
    check_options(output, format, int8, len(int8_calibration) if int8 else 1, opset)
    if int8:
        with _work_dir(output) as work:
            fp32 = export_onnx(checkpoint, str(Path(work) / "fp32.onnx"), opset, pasted_masks)
            return quantize_int8(str(fp32), output, int8_calibration)
    if format == "onnx":
        return export_onnx(checkpoint, output, opset, pasted_masks)
    return export_openvino(checkpoint, output, opset, pasted_masks)


def export_openvino(checkpoint: str, output: str, opset: int = 17, pasted_masks: bool = False) -> Path:
    import openvino

    check_options(output, "openvino", opset=opset)
    xml = Path(output)
    # Everything temporary in one folder beside the output, gone on success or failure (OpenVINO maps the
    # traced file's weights until save_model has written them).
    with _work_dir(output) as work:
        traced = Path(work) / "traced.onnx"
        metadata = _trace(checkpoint, traced, opset, pasted_masks)
        model = openvino.convert_model(str(traced))
        for key, value in metadata.items():
            model.set_rt_info(value, [key])
        saved = Path(work) / "model.xml"
        openvino.save_model(model, str(saved), compress_to_fp16=False)  # fp32 weights, as the ONNX file
        # Two files found by name: no .xml while the new weights move in, so a reader sees either nothing
        # or the new pair, never an old .xml with new weights.
        xml.unlink(missing_ok=True)
        saved.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        saved.replace(xml)
    return xml


def export_onnx(checkpoint: str, output: str, opset: int = 17, pasted_masks: bool = False) -> Path:
    import onnx

    with _work_dir(output) as work:
        traced = Path(work) / "traced.onnx"
        metadata = _trace(checkpoint, traced, opset, pasted_masks)
        graph = onnx.load(str(traced))
    _set_metadata(graph, metadata)
    atomic_write(output, lambda out: out.write(graph.SerializeToString()))
    return Path(output)


def _batched_nms_without_branch(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                                iou_threshold: float) -> torch.Tensor:
    """torchvision's batched_nms (its coordinate trick) without its no-boxes branch: traced, that branch is
    an ONNX If whose empty result OpenVINO's CPU plugin returns as one row of garbage, a made-up detection
    on every image without any. The 0 appended keeps the maximum defined when there are no boxes."""
    import torchvision

    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


def _trace(checkpoint: str, path: Path, opset: int, pasted_masks: bool,
           example_size: tuple[int, int] = (480, 640)) -> dict[str, str]:
    """The checkpoint's graph written to path as ONNX; returns the metadata an export carries."""
    loaded = load_model(checkpoint, device="cpu", amp="none")
    model = loaded.model.eval()
    model.backbone.channels_last = False
    model.transform.paste_masks = pasted_masks
    names = _outputs(pasted_masks)
    example = torch.rand(3, *example_size)
    from torchvision.ops import boxes as box_ops  # the module torchvision's RPN and RoI heads call it from

    with warnings.catch_warnings(), mock.patch.object(box_ops, "batched_nms", _batched_nms_without_branch):
        warnings.simplefilter("ignore")  # the tracer's many TracerWarnings are expected for this model
        # torchvision's detection models export through the TorchScript-based exporter.
        torch.onnx.export(model, ([example],), str(path), opset_version=opset, input_names=["image"],
                          output_names=names, dynamo=False,
                          dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0],
                                        names[-1]: [0, 2, 3] if pasted_masks else [0]})
    p = loaded.config.predict
    return dict(zip(METADATA_KEYS, (json.dumps(loaded.categories.to_dict()), str(p.mask_thresh),
                                    str(p.score_thresh), names[-1])))


def _work_dir(output: str) -> tempfile.TemporaryDirectory:
    """A temporary folder beside the output (same file system: files move in by rename), gone afterwards."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=Path(output).parent, prefix=".tinyseg-export-")


def _set_metadata(graph: Any, metadata: dict[str, str]) -> None:
    del graph.metadata_props[:]
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value


def calibration_images(folder: str, count: int = 16) -> list[Path]:
    """`count` images of a folder, spread evenly over the sorted names."""
    return spread(list_images(folder), count)


def spread(items: list, count: int) -> list:
    """`count` of the items (all if fewer), evenly spaced from the first."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not items:
        return []
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


def quantize_int8(onnx_path: str, output: str, images: list[Path]) -> Path:
    """Post-training static int8 (onnxruntime.quantization, QDQ) of an exported ONNX file, calibrated on
    `images` (training images: the ranges the model meets).

    Convolutions and fully connected layers only: RoIAlign, NMS (and a pasted-masks export's paste) stay fp32.
    Unsigned activations with signed 7-bit weights (reduce_range) and per-channel scales, as
    onnxruntime advises for x86 CPUs without VNNI, which saturate 8-bit products; CPUs with VNNI run it too."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ..data.images import load_rgb

    class Images:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.paths = iter(images)

        def get_next(self) -> dict | None:
            path = next(self.paths, None)
            if path is None:
                return None
            pixels = np.asarray(load_rgb(path), dtype=np.float32).transpose(2, 0, 1) / 255
            return {"image": np.ascontiguousarray(pixels)}

    # Its advice to pre-process (quant_pre_process) is left unprinted: on this export it changed neither
    # the speed nor the AP (benchmarks/README.md).
    def advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    logging.getLogger().addFilter(advice)
    try:
        with _work_dir(output) as work:  # the quantizer's files go there too
            quantized = Path(work) / "int8.onnx"
            quantize_static(onnx_path, quantized, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            calibrate_method=CalibrationMethod.MinMax)
            graph = onnx.load(str(quantized))
    finally:
        logging.getLogger().removeFilter(advice)
    _set_metadata(graph, _onnx_metadata(Path(onnx_path)))  # the source's keys, whatever the quantizer kept
    atomic_write(output, lambda out: out.write(graph.SerializeToString()))
    return Path(output)


RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")  # OpenVINO's inference precision hint; bf16 is fast only on CPUs with AVX512-BF16 or AMX


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


def runtime_for(path: str, runtime: str | None = None) -> str:
    """The runtime asked for, else the one that reads the file: OpenVINO for its IR (.xml), else onnxruntime."""
    is_ir = Path(path).suffix.lower() == ".xml"
    if runtime is None:
        return "openvino" if is_ir else RUNTIMES[0]
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if is_ir and runtime != "openvino":
        raise ValueError(f"{path} is an OpenVINO model: it runs with runtime openvino, not {runtime}")
    return runtime


class OnnxModel:
    """An exported model run by onnxruntime or OpenVINO: outputs by name as tinyseg's predictor has them
    ("mask_probs" for binary_masks, or a pasted-masks export's full-size "masks"), with the file's category ids."""

    def __init__(self, path: str, score_thresh: float | None = None, mask_thresh: float | None = None,
                 runtime: str | None = None, precision: str = PRECISIONS[0], max_detections: int | None = None):
        runtime = runtime_for(path, runtime)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "f32" and runtime != "openvino":
            raise ValueError(f"precision {precision} is OpenVINO's (its CPU plugin's bf16): onnxruntime runs f32")
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: exported model not found")
        try:
            self.run = _OnnxRuntime(path) if runtime == "onnxruntime" else _OpenVino(path, precision)
        except ImportError:
            raise
        except Exception as error:  # each runtime raises its own types for a file it cannot read
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path}: {runtime} cannot read it as a model ({first_line})") from error
        meta = self.run.metadata()
        if "tinyseg_categories" not in meta:
            raise CheckpointError(f"{path}: not a tinyseg export (no category map in its metadata)")
        masks = meta.get("tinyseg_masks", "masks")  # exports from before the key pasted their masks in the graph
        if masks not in ("masks", "mask_probs"):
            raise CheckpointError(f"{path}: unknown mask output {masks!r} (tinyseg_masks): exported by a newer tinyseg?")
        self.outputs = _outputs(masks == "masks")
        self.categories = CategoryMap.from_dict(json.loads(meta["tinyseg_categories"]))
        self.mask_thresh = float(meta["tinyseg_mask_thresh"]) if mask_thresh is None else mask_thresh
        self.score_thresh = score_thresh
        self.max_detections = max_detections  # at most the graph's own cap, the run's at export

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image: (3, H, W) float in [0, 1]. The outputs by name, as the model's in tinyseg's predictor:
        "mask_probs" for binary_masks to paste (or, from an export with pasted masks, full-size "masks")."""
        # Both runtimes read the buffer as C-contiguous: a permuted (HWC -> CHW) view would be scrambled.
        values = self.run(np.ascontiguousarray(image.numpy(), dtype=np.float32), self.outputs)
        output = {name: torch.from_numpy(value) for name, value in zip(self.outputs, values)}
        if self.score_thresh is not None:
            keep = output["scores"] >= self.score_thresh
            output = {k: v[keep] for k, v in output.items()}
        if self.max_detections is not None:  # the graph's detections come by falling score
            output = {k: v[:self.max_detections] for k, v in output.items()}
        return output

    def results(self, image: torch.Tensor, image_id: int) -> list[dict]:
        return to_coco_results(self(image), image_id, self.categories, self.mask_thresh, tuple(image.shape[-2:]))


class _OnnxRuntime:
    def __init__(self, path: str):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, image: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, {"image": image})


class _OpenVino:
    """OpenVINO's CPU plugin, compiled for each image size: with the size left dynamic, its CPU plugin
    mis-sizes the graph's resize (it asked for terabytes). The last few sizes stay compiled (datasets of
    photos have many sizes; each compiled model holds its own weights)."""

    KEEP = 4

    def __init__(self, path: str, precision: str = PRECISIONS[0]):
        import openvino

        self.precision = precision
        self.core = openvino.Core()
        self.path = str(path)
        self.model = self.core.read_model(self.path)
        self.compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def metadata(self) -> dict[str, str]:
        if Path(self.path).suffix.lower() == ".xml":  # an IR from export_openvino: the keys are in its runtime info
            return {key: self.model.get_rt_info([key]).astype(str) for key in METADATA_KEYS
                    if self.model.has_rt_info([key])}
        return _onnx_metadata(Path(self.path))  # OpenVINO does not expose the ONNX file's metadata_props

    def __call__(self, image: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if image.shape in self.compiled:
            self.compiled.move_to_end(image.shape)
        else:
            model = self.model.clone()
            model.reshape({"image": list(image.shape)})
            # Asked for, never the plugin's own choice: on CPUs with bf16 (AVX512-BF16, AMX) it would pick bf16
            self.compiled[image.shape] = self.core.compile_model(model, "CPU",
                                                                 {"INFERENCE_PRECISION_HINT": self.precision})
            if len(self.compiled) > self.KEEP:
                self.compiled.popitem(last=False)
        compiled = self.compiled[image.shape]
        values = compiled([image])
        return [np.asarray(values[compiled.output(name)]) for name in outputs]
