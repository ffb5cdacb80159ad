from . import backbones_regnet  # noqa: F401  (registers the RegNet names in BACKBONES)
from .backbones import BACKBONES, Trunk, register_backbone
from .detector import apply_inference_settings, build_model, set_precision
from .for_inference import prepare_for_inference
from .weights import BackboneWeightsError

__all__ = ["BACKBONES", "Trunk", "register_backbone", "apply_inference_settings", "build_model", "set_precision",
           "prepare_for_inference", "BackboneWeightsError"]
