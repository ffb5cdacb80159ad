"""Shared fixtures: a tiny generated dataset, tiny training settings, and the ../shared data when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSEG_SHARED", ROOT.parent / "shared")) / "datasets"

# Small enough to train in seconds on 2 CPU cores, big enough to learn the shapes.
TINY = [
    "model.backbone=resnet18", "model.init=none", "model.fpn_channels=32", "model.box_head_dim=128",
    "model.rpn_batch_size_per_image=64", "model.box_batch_size_per_image=32",
    "model.rpn_post_nms_top_n_train=200", "model.rpn_post_nms_top_n_test=200",
    "input.min_size=[96]", "input.max_size=160", "input.test_min_size=96", "input.test_max_size=160",
    "solver.optimizer=adamw", "solver.lr=0.002", "solver.weight_decay=0.01", "solver.batch_size=2",
    "solver.warmup_iters=10", "solver.clip_grad_norm=5.0", "data.num_workers=0", "train.log_every=1",
    "train.amp=none", "train.channels_last=false",
    "train.report=false",  # the report's tests turn it on; elsewhere its plots only cost time
]


# pyproject turns pycocotools' DeprecationWarning into an error (its decode warns under numpy 2, and a
# Ctrl-C while it warns broke training); tests that decode with pycocotools on purpose, as the grader
# and the tutorial scripts do, carry this mark.
decodes_with_pycocotools = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the real data at {path} (../shared is absent on a fresh clone; CI has it)")
    return path


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes dataset with non-contiguous category ids (3, 7, 12)."""
    from tinyseg.data.synthetic import make_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(out, train_images=8, val_images=4, test_images=5, size=(96, 112),
                               category_ids=(3, 7, 12), max_shapes=2, seed=1)


def tiny_config(shapes, output_dir, *extra: str):
    from tinyseg.config import load_config

    return load_config(None, TINY + [f"data.train_json={shapes['train']}", f"data.image_dir={shapes['images']}",
                                     f"data.val_json={shapes['val']}", f"train.output_dir={output_dir}", *extra])


@pytest.fixture(scope="session")
def trained_run(shapes, tmp_path_factory):
    """One short training, shared by the tests that need a trained checkpoint."""
    from tinyseg.training.trainer import train

    run_dir = tmp_path_factory.mktemp("trained")
    # Train on the train images and validate on the same images: the overfitting check.
    # 120 iterations: three augmented copies of the 8 images per epoch, so 10 checkpoints instead of 30.
    config = tiny_config(shapes, run_dir, f"data.val_json={shapes['train']}", "data.allow_val_overlap=true",
                         "solver.epochs=10", "input.copies=3", "train.eval_every=0", "train.report=true")
    summary = train(config)
    return {"run_dir": run_dir, "summary": summary, "shapes": shapes}


def run_cli(*args: str, check: bool = True, timeout: float = 600, process: bool = False):
    """`tinyseg ARGS`: in this process by default (each new process imports torch again, seconds apiece),
    with stdout, stderr and tinyseg's log captured as a subprocess's would be; process=True runs
    `python -m tinyseg` for real (the entry point itself, signals, torchrun)."""
    import contextlib
    import gc
    import io
    import logging
    import random
    import subprocess

    import torch

    if process:
        result = subprocess.run([sys.executable, "-m", "tinyseg", *args], capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT)
    else:
        from tinyseg.cli import main

        out, err = io.StringIO(), io.StringIO()
        logger = logging.getLogger("tinyseg")
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("%(message)s"))
        saved = (logger.level, logger.propagate, os.getcwd())
        # a command seeds the global RNGs (training does): later tests must not depend on which ran before
        rng = (torch.get_rng_state(), random.getstate(), torch.get_num_threads())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # pytest's own handlers would print it a second time
        try:
            os.chdir(ROOT)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(args))
                except SystemExit as error:  # argparse: usage errors and --help
                    code = error.code if isinstance(error.code, int) else 0 if error.code is None else 1
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            os.chdir(saved[2])
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            torch.set_num_threads(rng[2])
            gc.collect()  # a trainer's loader workers end with it, not at some later test
        result = subprocess.CompletedProcess(["tinyseg", *args], code, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"tinyseg {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def perturb(module):
    """Every tensor of module off its initial value, so that a loading test cannot pass by chance (BatchNorm's
    running_var of ones, biases of zeros); returns the module."""
    import torch

    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.02 - 0.01)
    return module


def with_duplicates(shapes, folder: Path):
    """The shapes training records and images copied to folder, plus a byte copy (id 1001) and a re-encoded
    JPEG (id 1002) of the first image: (records, the ids of that family)."""
    import shutil

    from PIL import Image

    from tinyseg.data.coco import ImageRecord, load_coco

    records = list(load_coco(shapes["train"]).images)
    shutil.copytree(shapes["images"], folder)
    original = records[0]
    shutil.copy(folder / original.file_name, folder / "copy.png")
    Image.open(folder / original.file_name).convert("RGB").save(folder / "reencoded.jpg", quality=92)
    records += [ImageRecord(1001, "copy.png", original.height, original.width),
                ImageRecord(1002, "reencoded.jpg", original.height, original.width)]
    return records, {original.image_id, 1001, 1002}
