"""benchmarks/reference_loop.py is the yardstick of every speed claim: it must train and write a valid
submission with the file's category ids, as the tutorial scripts did."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from tinyseg.config import InputConfig, ModelConfig, PredictConfig
from tinyseg.inference.submission import validate_submission
from tinyseg.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_loop as reference  # noqa: E402
from conftest import decodes_with_pycocotools  # noqa: E402


def tiny_reference_model(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", init="none", fpn_channels=32, box_head_dim=64),
                        num_classes, test=InputConfig(test_min_size=96, test_max_size=160),
                        predict=PredictConfig(score_thresh=0.0))
    # as throughput.py's reference side: the tutorial model resizes inside, fp32, plain layout
    model.transform = GeneralizedRCNNTransform(96, 160, model.transform.image_mean, model.transform.image_std)
    return model


@decodes_with_pycocotools  # as the tutorial scripts / the grader do
def test_reference_loop_trains_and_writes_a_valid_submission(shapes, tmp_path):
    dataset = reference.TutorialDataset(str(shapes["train"]), str(shapes["images"]))
    assert dataset.category_to_label == {3: 1, 7: 2, 12: 3}  # contiguous labels inside, as tinyseg's
    image, target = dataset[0]
    assert target["masks"].shape[1:] == image.shape[1:] and len(target["masks"]) == len(target["labels"])

    model = tiny_reference_model(4)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, collate_fn=reference.collate)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    assert reference.train_steps(model, loader, optimizer, 2) == 4
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "a training step must change the weights"

    test = json.loads(Path(shapes["test"]).read_text())
    entries = [(image["id"], image["file_name"]) for image in test["images"]]
    output = tmp_path / "reference.json"
    written = reference.predict_to_file(model, entries, str(shapes["images"]), str(output), category_ids=[3, 7, 12])
    assert written > 0  # score threshold 0: random weights still detect
    assert validate_submission(output, shapes["test"], shapes["train"]) == []
    assert {entry["category_id"] for entry in json.loads(output.read_text())} <= {3, 7, 12}
