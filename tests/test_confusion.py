"""The mask confusion matrix on hand-built cases where every cell's count is known."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tinyseg.evaluation.confusion import confusion_matrix

SIZE = 40


def rle(rows: slice, cols: slice) -> dict:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[rows, cols] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


A, B = 3, 7  # the file's ids, not 1..K


def dataset():
    images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": A, "segmentation": rle(slice(0, 10), slice(0, 10))},
        {"id": 2, "image_id": 1, "category_id": B, "segmentation": rle(slice(20, 30), slice(0, 10))},
        {"id": 3, "image_id": 1, "category_id": A, "segmentation": rle(slice(20, 30), slice(20, 30))},
        {"id": 4, "image_id": 1, "category_id": B, "iscrowd": 1, "segmentation": rle(slice(30, 40), slice(30, 40))},
        {"id": 5, "image_id": 3, "category_id": B, "segmentation": rle(slice(0, 10), slice(0, 10))},
    ]
    detections = [
        {"image_id": 1, "category_id": A, "score": 0.9, "segmentation": rle(slice(0, 10), slice(0, 10))},  # right
        {"image_id": 1, "category_id": A, "score": 0.8, "segmentation": rle(slice(20, 30), slice(0, 10))},  # B as A
        {"image_id": 1, "category_id": A, "score": 0.2, "segmentation": rle(slice(20, 30), slice(20, 30))},  # too low
        {"image_id": 1, "category_id": B, "score": 0.7, "segmentation": rle(slice(0, 10), slice(20, 30))},  # nothing there
        {"image_id": 1, "category_id": B, "score": 0.9, "segmentation": rle(slice(32, 36), slice(32, 36))},  # in the crowd
        {"image_id": 2, "category_id": A, "score": 0.6, "segmentation": rle(slice(5, 15), slice(5, 15))},  # empty image
        {"image_id": 99, "category_id": A, "score": 0.9, "segmentation": rle(slice(0, 10), slice(0, 10))},  # not in gt
    ]
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": B, "name": "b"}, {"id": A, "name": "a"}]}
    return gt, detections


@pytest.mark.parametrize("score_thresh, expected", [
    # rows: ground truth a, b, background; columns: predicted a, b, background
    (0.5, [[1, 0, 1],    # a: one found as a; one missed (its only detection scores 0.2)
           [1, 0, 1],    # b: one taken for an a; one missed (image 3 has no detections)
           [1, 1, 0]]),  # background: an a on the empty image, a b where nothing is; the crowd's is ignored
    (0.1, [[2, 0, 0], [1, 0, 1], [1, 1, 0]]),  # the 0.2 detection now counts and finds its object
])
def test_every_cell_of_a_hand_built_case(score_thresh, expected):
    gt, detections = dataset()
    matrix, names = confusion_matrix(gt, detections, score_thresh=score_thresh)
    assert names == ["a", "b", "background"]  # categories by id, whatever their order in the file
    assert matrix.tolist() == expected


def test_crowd_objects_are_not_missed_objects_and_only_cover_what_lies_inside():
    gt, detections = dataset()
    # 60% of this detection lies outside the crowd region: it is a false positive, not ignored.
    detections = [{"image_id": 1, "category_id": B, "score": 0.9, "segmentation": rle(slice(30, 40), slice(15, 40))}]
    matrix, _ = confusion_matrix(gt, detections)
    assert matrix[2].tolist() == [0, 1, 0]
    assert matrix[:, 2].tolist() == [2, 2, 0]  # every non-crowd object is missed; the crowd is not counted


def test_matching_is_greedy_over_all_pairs_highest_iou_first():
    """D1 takes G1 (IoU 1); D2's best object is also G1 (IoU 0.47), its second G2 (0.39). Greedy matching
    gives D2 to G2; keeping only each detection's best object first would leave D2 and G2 unmatched."""
    gt = {"images": [{"id": 1, "width": SIZE, "height": SIZE}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": A, "segmentation": rle(slice(0, 10), slice(0, 10))},
                          {"id": 2, "image_id": 1, "category_id": B, "segmentation": rle(slice(0, 10), slice(10, 20))}],
          "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}]}
    detections = [{"image_id": 1, "category_id": A, "score": 0.9, "segmentation": rle(slice(0, 10), slice(0, 10))},
                  {"image_id": 1, "category_id": B, "score": 0.8, "segmentation": rle(slice(0, 10), slice(2, 17))}]
    matrix, _ = confusion_matrix(gt, detections, iou_thresh=0.3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    # Above both of D2's IoUs it matches nothing: a false positive b and a missed b.
    matrix, _ = confusion_matrix(gt, detections, iou_thresh=0.5)
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
