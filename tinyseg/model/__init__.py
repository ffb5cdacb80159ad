from .build import BACKBONES, build_model, set_inference_options, set_precision
from .inference import prepare_for_inference
from .weights import BackboneWeightsError

__all__ = ["BACKBONES", "build_model", "set_inference_options", "set_precision", "prepare_for_inference", "BackboneWeightsError"]
