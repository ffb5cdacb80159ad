"""tinyseg: Mask R-CNN instance segmentation for small COCO-format datasets."""

__version__ = "0.1.0"

__all__ = ["Predictor", "Instance", "train", "evaluate", "compare", "cross_validate", "__version__"]


def __getattr__(name):
    # Lazy, so that `import tinyseg` and the CLI's --help stay fast (torch loads on first use).
    if name in ("Predictor", "Instance", "train", "evaluate", "compare", "cross_validate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tinyseg' has no attribute {name!r}")
