from .detector import BACKBONES, apply_inference_settings, build_model, set_precision
from .for_inference import prepare_for_inference
from .weights import BackboneWeightsError

__all__ = ["BACKBONES", "apply_inference_settings", "build_model", "set_precision", "prepare_for_inference",
           "BackboneWeightsError"]
