"""Export a checkpoint to ONNX (dynamic image size) and run the ONNX model with onnxruntime or OpenVINO.

(TorchScript is not offered: torch.jit.script rejects the AMP backbone's annotations, and TorchScript
is deprecated upstream; ONNX is the portable format.)

The exported graph takes one float RGB image (3, H, W) in [0, 1] and contains the resize, the
normalisation and the mapping back to the input's pixels, so a caller needs no tinyseg code. The
category map and prediction settings travel in the ONNX metadata.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.coco import CategoryMap
from ..runtime.checkpoint import CheckpointError
from ..runtime.files import atomic_write
from .predictor import load_model, to_coco_results

log = logging.getLogger("tinyseg")
OUTPUTS = ["boxes", "labels", "scores", "masks"]


def export_onnx(checkpoint: str, output: str, opset: int = 17, example_size: tuple[int, int] = (480, 640)) -> Path:
    import onnx

    loaded = load_model(checkpoint, device="cpu", amp="none")
    model = loaded.model.eval()
    model.backbone.channels_last = False
    example = torch.rand(3, *example_size)
    temp = Path(output).with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's many TracerWarnings are expected for this model
        # torchvision's detection models export through the TorchScript-based exporter.
        torch.onnx.export(model, ([example],), str(temp), opset_version=opset, input_names=["image"],
                          output_names=OUTPUTS, dynamo=False,
                          dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0],
                                        "masks": [0, 2, 3]})
    graph = onnx.load(str(temp))
    p = loaded.config.predict
    metadata = {"tinyseg_categories": json.dumps(loaded.categories.to_dict()),
                "tinyseg_mask_thresh": str(p.mask_thresh), "tinyseg_score_thresh": str(p.score_thresh)}
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    temp.unlink()
    atomic_write(output, lambda out: out.write(graph.SerializeToString()))
    return Path(output)


RUNTIMES = ("onnxruntime", "openvino")


class OnnxModel:
    """An exported model run by onnxruntime or OpenVINO; outputs as torchvision's, with the file's category ids."""

    def __init__(self, path: str, score_thresh: float | None = None, mask_thresh: float | None = None,
                 runtime: str = RUNTIMES[0]):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.run = _OnnxRuntime(path) if runtime == "onnxruntime" else _OpenVino(path)
        meta = self.run.metadata()
        if "tinyseg_categories" not in meta:
            raise CheckpointError(f"{path}: not a tinyseg ONNX export (no category map in its metadata)")
        self.categories = CategoryMap.from_dict(json.loads(meta["tinyseg_categories"]))
        self.mask_thresh = float(meta["tinyseg_mask_thresh"]) if mask_thresh is None else mask_thresh
        self.score_thresh = score_thresh

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image: (3, H, W) float in [0, 1]."""
        # Both runtimes read the buffer as C-contiguous: a permuted (HWC -> CHW) view would be scrambled.
        values = self.run(np.ascontiguousarray(image.numpy(), dtype=np.float32))
        output = {name: torch.from_numpy(value) for name, value in zip(OUTPUTS, values)}
        if self.score_thresh is not None:
            keep = output["scores"] >= self.score_thresh
            output = {k: v[keep] for k, v in output.items()}
        return output

    def results(self, image: torch.Tensor, image_id: int) -> list[dict]:
        return to_coco_results(self(image), image_id, self.categories, self.mask_thresh)


class _OnnxRuntime:
    def __init__(self, path: str):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        return self.session.run(OUTPUTS, {"image": image})


class _OpenVino:
    """OpenVINO's CPU plugin, compiled for each image size: with the size left dynamic, its CPU plugin
    mis-sizes the graph's resize (it asked for terabytes). The last few sizes stay compiled (datasets of
    photos have many sizes; each compiled model holds its own weights)."""

    KEEP = 4

    def __init__(self, path: str):
        import openvino

        self.core = openvino.Core()
        self.path = str(path)
        self.model = self.core.read_model(self.path)
        self.compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def metadata(self) -> dict[str, str]:
        import onnx  # OpenVINO does not expose the ONNX file's metadata_props

        return {entry.key: entry.value for entry in onnx.load(self.path, load_external_data=False).metadata_props}

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        if image.shape in self.compiled:
            self.compiled.move_to_end(image.shape)
        else:
            model = self.model.clone()
            model.reshape({"image": list(image.shape)})
            # fp32 as the export: on CPUs with bf16 (AVX512-BF16, AMX) the plugin would otherwise pick bf16
            self.compiled[image.shape] = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            if len(self.compiled) > self.KEEP:
                self.compiled.popitem(last=False)
        compiled = self.compiled[image.shape]
        values = compiled([image])
        return [np.asarray(values[compiled.output(name)]) for name in OUTPUTS]
