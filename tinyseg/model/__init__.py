from .build import BACKBONES, build_model, set_inference_options, set_precision
from .weights import BackboneWeightsError

__all__ = ["BACKBONES", "build_model", "set_inference_options", "set_precision", "BackboneWeightsError"]
