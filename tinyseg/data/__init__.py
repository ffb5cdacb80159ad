from .coco import CategoryMap, CocoData, DatasetError, ImageRecord, Problem, inspect_coco, load_coco

__all__ = ["CategoryMap", "CocoData", "DatasetError", "ImageRecord", "Problem", "inspect_coco", "load_coco"]
