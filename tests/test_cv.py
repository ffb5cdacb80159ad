"""k-fold cross-validation: leak-free balanced folds, and `tinyseg train --folds K` end to end."""

import json
import statistics
from collections import Counter

import pytest

from conftest import TINY, needs_shared, run_cli, with_duplicates
from tinyseg.data.coco import load_coco
from tinyseg.data.split import fold_assignments


def test_folds_keep_duplicates_together_and_balance(shapes, tmp_path):
    folder = tmp_path / "images"
    records, family = with_duplicates(shapes, folder)
    seen = set()
    for seed in range(6):
        folds = fold_assignments(folder, records, 3, seed)
        assert folds == fold_assignments(folder, records, 3, seed), "not reproducible for a seed"
        assert len(folds) == len(records) and set(folds) == {0, 1, 2}, "every image in exactly one of 3 folds"
        assert len({f for f, r in zip(folds, records) if r.image_id in family}) == 1, \
            f"seed {seed}: a duplicate family is split between folds"
        sizes = Counter(folds).values()
        assert max(sizes) - min(sizes) <= len(family), f"seed {seed}: fold sizes {sorted(sizes)}"
        seen.add(tuple(folds))
    assert len(seen) > 1, "the seed does not change the folds"


def test_folds_without_duplicates_differ_by_at_most_one_image(shapes):
    records = load_coco(shapes["train"]).images  # 8 distinct images
    for k in (2, 3, 5):
        sizes = Counter(fold_assignments(shapes["images"], records, k, seed=0)).values()
        assert len(sizes) == k and max(sizes) - min(sizes) <= 1, f"{k} folds: {sorted(sizes)}"
    with pytest.raises(ValueError, match="9 folds"):
        fold_assignments(shapes["images"], records, 9, seed=0)


def test_folds_setting_is_checked():
    from tinyseg.config import ConfigError, load_config

    assert load_config(None, ["data.folds=3"]).data.folds == 3
    with pytest.raises(ConfigError, match="data.folds"):
        load_config(None, ["data.folds=1"])


def test_cross_validation_on_fruits_nuts_end_to_end(tmp_path, monkeypatch, capsys):
    data = needs_shared("fruits_nuts")
    out = tmp_path / "cv"
    # Short and small: 2 steps per fold, no TTA, 10 detections per image (the mask head runs on each).
    short = [*TINY, "solver.max_iters=2", "solver.warmup_iters=1", "train.eval_every=0", "train.max_time_min=0",
             "predict.tta=false", "predict.max_detections=10", "input.photometric=false"]
    result = run_cli("train", "--config", "scratch-cpu", "--train-json", str(data / "trainval.json"),
                     "--image-dir", str(data / "images"), "--output-dir", str(out), "--folds", "3", *short)
    source = json.loads((data / "trainval.json").read_text())
    all_ids = {image["id"] for image in source["images"]}
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    val_sets = [set(fold["val_image_ids"]) for fold in summary["per_fold"]]
    assert sum(len(v) for v in val_sets) == len(all_ids) == 18 and set().union(*val_sets) == all_ids, \
        "the val folds must partition the images"
    for index, fold in enumerate(summary["per_fold"]):
        run_dir = out / f"fold_{index}"
        assert (run_dir / "last.pt").is_file() and (run_dir / "fold_result.json").is_file()
        assert fold["iterations"] == json.loads((run_dir / "fold_result.json").read_text())["iterations"] > 0
        train = json.loads((run_dir / "train.json").read_text())
        val = json.loads((run_dir / "val.json").read_text())
        assert {i["id"] for i in val["images"]} == val_sets[index]
        assert {i["id"] for i in train["images"]} == all_ids - val_sets[index], "a fold trains on its val images"
        names = [(c["id"], c["name"]) for c in source["categories"]]
        assert [(c["id"], c["name"]) for c in train["categories"]] == names, "category ids must round-trip"
        assert val["categories"] == train["categories"]
        assert {a["image_id"] for a in val["annotations"]} <= val_sets[index]
        assert 0 <= fold["segm_AP50"] <= 1 and fold["val_images"] == len(val_sets[index])
        saved = json.loads((run_dir / "fold_result.json").read_text())
        assert saved["best_epoch"] == saved["epochs"], "one evaluation (train.eval_every=0): the last is the best"
    for metric in ("segm_AP50", "segm_AP", "bbox_AP50"):
        values = [fold[metric] for fold in summary["per_fold"]]
        assert summary["mean"][metric] == pytest.approx(statistics.fmean(values))
        assert summary["std"][metric] == pytest.approx(statistics.stdev(values))
        assert (summary["min"][metric], summary["max"][metric]) == (min(values), max(values))
    printed = result.stdout
    assert "cross-validation: 3 folds" in printed and "segm AP50" in printed
    assert all(line in printed for line in ("\nmean ", "\nstd ", "\nmin ", "\nmax "))

    # The same command again, in process: every fold is finished, so nothing trains; same summary.
    import tinyseg.training.trainer as trainer_module
    from tinyseg.api import cross_validate
    from tinyseg.config import ConfigError

    def refuse(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(trainer_module, "Trainer", refuse)
    paths = [f"data.train_json={data / 'trainval.json'}", f"data.image_dir={data / 'images'}",
             f"train.output_dir={out}"]
    assert cross_validate("scratch-cpu", paths + short, folds=3) == summary
    assert "mean " in capsys.readouterr().out
    # --resume without --config goes on with the cross-validation's own settings (it fell back to `default`)
    from tinyseg.api import train

    assert train(None, [f"train.output_dir={out}"], resume=True) == summary
    assert "mean " in capsys.readouterr().out
    # Another recipe in the same folder would mix two recipes' folds: refused, naming the setting.
    with pytest.raises(ConfigError, match="solver.lr"):
        cross_validate("scratch-cpu", paths + short + ["solver.lr=0.01"], folds=3)


def test_cross_validation_refuses_what_it_cannot_do(shapes, tmp_path):
    """Refused before any training: a val file, more folds than distinct images, no folds."""
    from tinyseg.api import cross_validate
    from tinyseg.config import ConfigError
    from tinyseg.data.coco import DatasetError

    base = [*TINY, f"data.train_json={shapes['train']}", f"data.image_dir={shapes['images']}",
            f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="data.val_json"):
        cross_validate(None, base + [f"data.val_json={shapes['val']}"], folds=2)
    with pytest.raises(DatasetError, match=r"train\.json: data\.folds: 9 folds"):
        cross_validate(None, base, folds=9)
    with pytest.raises(ConfigError, match="folds >= 2"):
        cross_validate(None, base)
    assert not list(tmp_path.iterdir()), "nothing is written when the request is refused"


def test_fold_files_keep_category_ids_and_read_back(shapes, tmp_path):
    """Each fold file has every category (ids 3, 7, 12 here) and passes the loader, also when the source
    file's annotations carry no ids (the fold files are written from the loaded data)."""
    from tinyseg.config import load_config
    from tinyseg.training.cross_validation import coco_subset, plan_folds
    from tinyseg.runtime.files import write_json

    source = json.loads(shapes["train"].read_text())
    for annotation in source["annotations"]:
        annotation.pop("id", None)
    write_json(tmp_path / "no_ids.json", source)
    config = load_config(None, [f"data.train_json={tmp_path / 'no_ids.json'}", f"data.image_dir={shapes['images']}",
                                f"train.output_dir={tmp_path / 'cv'}", "data.folds=3"])
    folds, full = plan_folds(config)
    assert sorted(i for f in folds for i in f.val_ids) == sorted(i["id"] for i in source["images"])
    for fold in folds:
        for name, ids in (("train", fold.train_ids), ("val", fold.val_ids)):
            write_json(tmp_path / f"{name}.json", coco_subset(full, ids))
            loaded = load_coco(tmp_path / f"{name}.json")
            assert loaded.categories.category_ids == [3, 7, 12]
            assert sorted(r.image_id for r in loaded.images) == sorted(ids)
        assert not set(fold.train_ids) & set(fold.val_ids)


def test_fold_result_records_the_best_epoch_as_a_number(tmp_path, monkeypatch):
    """fold_result.json's best_epoch is the epoch (the trainer's best is a dict of that epoch's metrics)."""
    import tinyseg.training.trainer as trainer_module
    from tinyseg.config import Config
    from tinyseg.training.cross_validation import Fold, _train_fold
    from tinyseg.runtime.files import write_json

    class Trained:
        def __init__(self, config, resume=False):
            pass

        def fit(self):
            return {"best": {"epoch": 3, "iteration": 30, "segm_AP50": 0.4}, "epochs": 4, "iterations": 40,
                    "seconds": 1.0}

    monkeypatch.setattr(trainer_module, "Trainer", Trained)
    stats = {"stats": {"AP50": 0.5, "AP": 0.3}}
    write_json(tmp_path / "val_results.json", {"segm": stats, "bbox": stats})
    result = _train_fold(Fold(0, tmp_path, [1, 2], [3], Config()), resume=False)
    saved = json.loads((tmp_path / "fold_result.json").read_text())
    assert result["best_epoch"] == saved["best_epoch"] == 3
    assert saved["segm_AP50"] == 0.5 and saved["epochs"] == 4  # scored on the last evaluation, not the best
