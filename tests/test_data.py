"""course_lib.data: the scenes generator, the shipped photos and digits, and load_hf offline."""

import numpy as np
import pytest
import torch

from course_lib import data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))


def test_scene_is_deterministic_and_depends_on_index_only():
    a, b = data.render_scene(7, seed=3), data.render_scene(7, seed=3)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not np.array_equal(a["image"], data.render_scene(8, seed=3)["image"])


def test_scenes_dataset_columns_and_consistency():
    ds = data.scenes(200, "train")
    assert set(ds.column_names) == {"image", "label", "mask", "objects", "count", "background", "caption", "questions", "answers"}
    assert ds.features["label"].names == data.SHAPES
    for row in ds.select(range(50)):
        objs = row["objects"]
        assert 1 <= row["count"] == len(objs) <= 3
        assert objs[0]["size"] == "large" and all(o["size"] == "small" for o in objs[1:])
        assert row["label"] == data.SHAPES.index(objs[0]["shape"])
        mask = np.asarray(row["mask"])
        assert set(np.unique(mask)) <= set(range(len(objs) + 1))
        assert (mask == 1).sum() > (mask == 2).sum() if len(objs) > 1 else True  # the large object is larger
        for o in objs:  # the caption names every object with its attributes
            assert f"{o['size']} {o['color']} {o['shape']}" in row["caption"]
        assert len(row["questions"]) == len(row["answers"]) == 5
        assert row["answers"][0] == objs[0]["shape"] and row["answers"][1] == objs[0]["color"]
        assert row["answers"][2] == data.NUMBERS[len(objs)]
        assert row["answers"][4] in ("yes", "no")
    image = np.asarray(ds[0]["image"])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_yes_no_answers_are_true():
    ds = data.scenes(100, "validation")
    for row in ds:
        q, a = row["questions"][4], row["answers"][4]
        color, shape = q.removeprefix("is there a ").removesuffix("?").split()
        present = any(o["color"] == color and o["shape"] == shape for o in row["objects"])
        assert (a == "yes") == present


def test_splits_differ_and_cache_round_trips(tmp_path):
    train, test = data.scenes(50, "train"), data.scenes(50, "test")
    assert train[0]["caption"] != test[0]["caption"] or not np.array_equal(np.asarray(train[0]["image"]), np.asarray(test[0]["image"]))
    again = data.scenes(50, "train")  # from the cache
    assert np.array_equal(np.asarray(again[3]["image"]), np.asarray(train[3]["image"]))
    assert list((tmp_path / "cache").iterdir()), "nothing was cached"


@pytest.mark.slow
def test_labels_are_roughly_balanced():
    y = torch.tensor(data.scenes(1000, "train")["label"])
    counts = torch.bincount(y, minlength=5).float() / 1000
    assert counts.min() > 0.15 and counts.max() < 0.25, counts


def test_resolution_and_single_object_options():
    ds = data.scenes(20, "train", resolution=48, max_objects=1)
    assert np.asarray(ds[0]["image"]).shape == (48, 48, 3)
    assert set(ds["count"]) == {1}


@pytest.mark.parametrize("kwargs,match", [(dict(split="dev"), "split must be one of"), (dict(resolution=8), "too small"),
                                          (dict(max_objects=4), "max_objects must be"), (dict(n=0), "n must be positive")])
def test_scenes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.scenes(**{"n": 4, **kwargs})


def test_to_tensors():
    x, y = data.to_tensors(data.scenes(10, "train"))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long and y.shape == (10,)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(data.PHOTOS))
def test_photos_load_offline(name):
    img = data.photo(name)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 400
    assert data.photo(name, size=64).shape == (64, 64, 3)


def test_unknown_photo_lists_the_available_ones():
    with pytest.raises(ValueError, match="grace_hopper"):
        data.photo("mona_lisa")


def test_digits():
    ds = data.digits(size=16)
    assert len(ds) == 1797 and np.asarray(ds[0]["image"]).shape == (16, 16, 3)
    assert ds.features["label"].num_classes == 10


@pytest.mark.slow
def test_load_hf_reads_a_local_folder_laid_out_like_the_hub(tmp_path):
    """Like cifar10 on the hub: data/train-*.parquet with an `img` image column and a `label` ClassLabel."""
    import datasets

    src = data.scenes(30, "train")
    hub_like = src.select_columns(["image", "label"]).rename_column("image", "img").cast_column("img", datasets.Image())
    folder = tmp_path / "hub_dataset"
    (folder / "data").mkdir(parents=True)
    hub_like.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    ds = data.load_hf(str(folder), split="train", resolution=16, label_column="label")
    assert ds.column_names == ["image", "label"] and len(ds) == 30
    assert ds[0]["image"].size == (16, 16) and ds[5]["label"] == src[5]["label"]
    x, y = data.to_tensors(ds)
    assert x.shape == (30, 3, 16, 16)


@pytest.mark.slow
def test_load_hf_offline_hub_id_gives_clear_error():
    with pytest.raises(OSError, match="Offline, use the course's own data"):
        data.load_hf("definitely-not-a-local-folder/cifar10")


def test_attribute_labels_match_the_objects():
    ds = data.scenes(20, "train")
    shapes, colors, backgrounds = (data.attribute_labels(ds, a) for a in ("shape", "color", "background"))
    assert torch.equal(shapes, torch.tensor(ds["label"]))  # the class label is the large object's shape
    assert [data.SCENE_ATTRIBUTES["color"][c] for c in colors] == [o[0]["color"] for o in ds["objects"]]
    assert [data.BACKGROUNDS[b] for b in backgrounds] == ds["background"]
    with pytest.raises(ValueError, match="attribute must be one of"):
        data.attribute_labels(ds, "size")
