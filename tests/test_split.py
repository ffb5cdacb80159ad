from tinyseg.data.coco import load_coco
from tinyseg.data.split import split_records


def test_split_is_seeded_and_disjoint(shapes):
    records = load_coco(shapes["train"]).images
    train_a, val_a = split_records(shapes["images"], records, 0.25, seed=3)
    train_b, val_b = split_records(shapes["images"], records, 0.25, seed=3)
    assert [r.image_id for r in val_a] == [r.image_id for r in val_b]
    assert not {r.image_id for r in train_a} & {r.image_id for r in val_a}
    assert len(train_a) + len(val_a) == len(records) and val_a


def test_duplicates_stay_on_one_side(shapes, tmp_path):
    """Copies of an image under new ids (byte copy and re-encoded JPEG) never straddle the split."""
    from conftest import with_duplicates

    folder = tmp_path / "images"
    records, family = with_duplicates(shapes, folder)
    for seed in range(8):
        train, val = split_records(folder, records, 0.3, seed)
        sides = {("train" if r in train else "val") for r in records if r.image_id in family}
        assert len(sides) == 1, f"seed {seed}: duplicates split across train and val"


def test_images_checked_at_start_up_are_not_decoded_again_for_the_split(shapes, monkeypatch):
    import tinyseg.data.images as images_module
    from tinyseg.data.images import check_images

    records = load_coco(shapes["train"]).images
    assert check_images(shapes["images"], records, "train.json") == []

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded a second time")

    monkeypatch.setattr(images_module, "load_rgb", refuse)
    train, val = split_records(shapes["images"], records, 0.25, seed=3)
    assert len(train) + len(val) == len(records)
