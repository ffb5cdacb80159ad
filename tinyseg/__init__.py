"""tinyseg: Mask R-CNN instance segmentation for small COCO-format datasets."""

__version__ = "0.1.0"
