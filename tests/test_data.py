"""The data package: the synthetic world, the two annotation formats, data-spec strings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainables.data import (
    DataSpec,
    SyntheticWorld,
    check_min_captions,
    collate,
    describe,
    load_captions_json,
    load_dataset,
    load_karpathy,
    parse_data_spec,
)
from trainables.data.synthetic import BACKGROUNDS, COLOURS, POSITION_WORDS, SHAPES, SIZE_WORDS, Scene
from trainables.errors import UserError

# ---- the synthetic world ------------------------------------------------------------------


def test_same_seed_gives_the_same_world():
    a, b = SyntheticWorld("train", 20, seed=3), SyntheticWorld("train", 20, seed=3)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions


@pytest.mark.parametrize("other", [dict(split="train", seed=1), dict(split="test", seed=0)])
def test_other_seed_or_split_gives_another_world(other):
    base = SyntheticWorld("train", 20, seed=0)
    different = SyntheticWorld(other["split"], 20, seed=other["seed"])
    assert not torch.equal(base.images, different.images)
    assert base.captions != different.captions


def test_a_smaller_world_is_a_prefix_of_a_larger_one():
    small, large = SyntheticWorld("test", 7, seed=2), SyntheticWorld("test", 30, seed=2)
    assert torch.equal(small.images, large.images[:7])
    assert small.captions == large.captions[:7]


def test_items_are_pixel_space_images_with_five_distinct_captions():
    world = SyntheticWorld("train", 50, image_size=32, seed=0)
    for index in range(len(world)):
        item = world[index]
        assert item.image.dtype == torch.float32 and item.image.shape == (3, 32, 32)
        assert 0.0 <= item.image.min() and item.image.max() <= 1.0
        assert len(item.captions) == 5 and len(set(item.captions)) == 5
        assert item.item_id == f"synthetic-train-{index}"
    batch = collate([world[0], world[1]])
    assert batch.images.shape == (2, 3, 32, 32) and batch.item_ids == ["synthetic-train-0", "synthetic-train-1"]


def test_every_caption_mentions_every_attribute():
    world = SyntheticWorld("train", 200, seed=0)
    for scene, captions in zip(world.scenes, world.captions):
        count_words = {1: ("one", "1", "single"), 2: ("two", "2", "pair"), 3: ("three", "3")}[scene.count]
        for caption in captions:
            words = set(re.findall(r"[a-z0-9-]+", caption))
            assert scene.colour in words and scene.background in words, caption
            assert scene.shape in caption, caption  # "cross" in "crosses"
            assert words & set(SIZE_WORDS[scene.size]), caption
            assert any(phrase in caption for phrase in POSITION_WORDS[scene.position]), caption
            assert words & set(count_words), caption


def test_the_vocabularies_are_large_enough_and_backgrounds_never_match_objects():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 4
    assert not set(COLOURS) & set(BACKGROUNDS)
    assert not set(COLOURS.values()) & set(BACKGROUNDS.values())


def test_describe_phrases_each_template_differently():
    captions = describe(Scene("cross", "red", "small", 2, "left", "white"))
    assert captions[0] == "two small red crosses on the left over a white background"
    assert len(set(captions)) == 5


def test_images_are_not_near_identical():
    world = SyntheticWorld("test", 200, image_size=32, seed=0)
    pixels = world.images.to(torch.float32) / 255
    # Std across images, per pixel, averaged: near 0 if the world rendered one picture.
    assert pixels.std(dim=0).mean() > 0.15
    # And no two of the first 50 images are (almost) equal.
    flat = pixels[:50].flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(50) * 1e9
    assert distances.min() > 1.0


@pytest.mark.parametrize("size", [64, 224])
def test_larger_image_sizes_work(size):
    item = SyntheticWorld("test", 3, image_size=size)[2]
    assert item.image.shape == (3, size, size) and 0 <= item.image.min() and item.image.max() <= 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(8, 72), split=st.sampled_from(["train", "test"]), n=st.integers(1, 4))
def test_any_seed_and_size_gives_valid_items(seed, size, split, n):
    world = SyntheticWorld(split, n, image_size=size, seed=seed)
    assert len(world) == n
    for item in (world[i] for i in range(n)):
        assert item.image.shape == (3, size, size) and item.image.dtype == torch.float32
        assert 0.0 <= item.image.min() and item.image.max() <= 1.0
        assert len(set(item.captions)) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(split="val", num_images=3), "split 'val'.*train, test"),
        (dict(split="train", num_images=0), "0 images"),
        (dict(split="train", num_images=3, image_size=4), "image size 4"),
        (dict(split="train", num_images=3, seed=-1), "seed -1"),
    ],
)
def test_bad_synthetic_arguments_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        SyntheticWorld(**kwargs)


# ---- annotation files -------------------------------------------------------------------


def _write_image(path: Path, size: tuple[int, int] = (40, 24), colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def karpathy(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny dataset_coco.json in Karpathy's format, with a filepath entry and a restval split."""
    images = tmp_path / "coco"
    _write_image(images / "a.png")
    _write_image(images / "val2014" / "b.jpg", size=(24, 40))
    _write_image(images / "c.png")
    _write_image(images / "d.jpg")
    data = {
        "images": [
            {"filename": "a.png", "imgid": 0, "split": "train", "sentences": [{"raw": "A cat .", "tokens": ["a", "cat"]}]},
            {"filename": "b.jpg", "filepath": "val2014", "imgid": 1, "split": "test", "sentences": [{"raw": " A dog. "}, {"raw": "A pup."}]},
            {"filename": "c.png", "imgid": 2, "split": "restval", "sentences": [{"raw": "A bird."}]},
            {"filename": "d.jpg", "imgid": 3, "split": "test", "sentences": [{"raw": "A fish."}]},
        ],
        "dataset": "coco",
    }
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps(data))
    return json_path, images


def test_karpathy_loader_picks_the_split_and_its_captions(karpathy):
    json_path, images = karpathy
    test = load_karpathy(json_path, images, "test", image_size=32)
    assert [r.item_id for r in test.records] == ["val2014/b.jpg", "d.jpg"]
    assert test.records[0].path == images / "val2014" / "b.jpg"
    assert test.records[0].captions == ("A dog.", "A pup.")
    item = test[0]
    assert item.image.shape == (3, 32, 32) and 0 <= item.image.min() and item.image.max() <= 1
    assert item.item_id == "val2014/b.jpg" and item.captions == ("A dog.", "A pup.")
    assert [r.item_id for r in load_karpathy(json_path, images, "restval", 16).records] == ["c.png"]
    assert [r.item_id for r in load_karpathy(json_path, images, "train+restval", 16).records] == ["a.png", "c.png"]


def test_decoded_images_keep_their_colour(karpathy):
    json_path, images = karpathy
    image = load_karpathy(json_path, images, "train", image_size=16)[0].image
    assert torch.allclose(image[:, 8, 8], torch.tensor([200, 30, 30]) / 255, atol=0.02)


@pytest.fixture
def albef(tmp_path: Path) -> tuple[Path, Path]:
    """A captions list in the ALBEF/SGA format: list captions and repeated single-string ones."""
    root = tmp_path / "flickr"
    _write_image(root / "flickr30k-images" / "1.jpg")
    _write_image(root / "flickr30k-images" / "2.jpg")
    data = [
        {"image": "flickr30k-images/1.jpg", "caption": ["One man .", "A man."], "image_id": "1"},
        {"image": "flickr30k-images/2.jpg", "caption": "Two dogs."},
        {"image": "flickr30k-images/2.jpg", "caption": "Dogs run."},
    ]
    json_path = tmp_path / "flickr30k_train.json"
    json_path.write_text(json.dumps(data))
    return json_path, root


def test_captions_json_loader_accepts_lists_and_strings_and_merges_images(albef):
    json_path, root = albef
    dataset = load_captions_json(json_path, root, image_size=24)
    assert len(dataset) == 2
    assert dataset.records[0].captions == ("One man .", "A man.")
    assert dataset.records[1].captions == ("Two dogs.", "Dogs run.")
    item = dataset[1]
    assert item.item_id == "flickr30k-images/2.jpg" and item.image.shape == (3, 24, 24)


def _karpathy_with(tmp_path: Path, entries) -> Path:
    path = tmp_path / "bad_karpathy.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def test_missing_json_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=re.escape(str(missing)) + ".*does not exist"):
        load_karpathy(missing, tmp_path, "test", 32)


def test_missing_images_folder_is_named(karpathy, tmp_path):
    json_path, _ = karpathy
    folder = tmp_path / "no_such_folder"
    with pytest.raises(UserError, match=re.escape(str(folder)) + ".*images="):
        load_karpathy(json_path, folder, "test", 32)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"image": "a.jpg",\n  "caption": ]')
    with pytest.raises(UserError, match=re.escape(str(path)) + r".*not valid JSON \(line 3, column"):
        load_captions_json(path, tmp_path, 32)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([{"filename": "a.png", "split": "test", "sentences": [{"raw": "x"}]}, {"filename": "b.png", "split": "test"}], "entry 1 .*'sentences'"),
        ([{"split": "test", "sentences": [{"raw": "x"}]}], "entry 0 .*'filename'"),
        ([{"filename": "a.png", "sentences": [{"raw": "x"}]}], "entry 0 .*'split'"),
        ([{"filename": "a.png", "split": "test", "sentences": [{"text": "x"}]}], "entry 0 .*'raw'"),
        ([{"filename": "a.png", "split": "test", "sentences": []}], "entry 0 .*'sentences'"),
    ],
)
def test_karpathy_entries_missing_fields_are_named(tmp_path, entries, match):
    path = _karpathy_with(tmp_path, entries)
    with pytest.raises(UserError, match=match + r".*must look like"):
        load_karpathy(path, tmp_path, "test", 32)


def test_karpathy_file_without_images_field_says_the_format(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(UserError, match="'images'.*Karpathy file looks like"):
        load_karpathy(path, tmp_path, "test", 32)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"image": "a.jpg"}], "entry 0 .*'caption'"),
        ([{"image": "a.jpg", "caption": ["x"]}, {"caption": ["y"]}], "entry 1 .*'image'"),
        ([{"image": "a.jpg", "caption": []}], "entry 0 .*'caption'"),
        ([{"image": "a.jpg", "caption": [3]}], "entry 0 .*'caption'"),
        (["a.jpg"], "entry 0 .*not an object"),
    ],
)
def test_captions_json_entries_missing_fields_are_named(tmp_path, data, match):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=match + r".*must look like"):
        load_captions_json(path, tmp_path, 32)


def test_each_format_hints_at_the_other(karpathy, albef):
    karpathy_json, images = karpathy
    albef_json, root = albef
    with pytest.raises(UserError, match="karpathy:"):
        load_captions_json(karpathy_json, images, 32)
    with pytest.raises(UserError, match="captions-json:"):
        load_karpathy(albef_json, root, "test", 32)


def test_absent_split_lists_the_splits_present(karpathy):
    json_path, images = karpathy
    with pytest.raises(UserError, match=r"split 'tset'.*restval \(1 images\), test \(2 images\), train \(1 images\)"):
        load_karpathy(json_path, images, "tset", 32)


def test_missing_image_file_is_named_at_construction(karpathy):
    json_path, images = karpathy
    (images / "d.jpg").unlink()
    with pytest.raises(UserError, match="1 of 2 images .*" + re.escape(str(images / "d.jpg"))):
        load_karpathy(json_path, images, "test", 32)


def test_corrupt_image_names_its_path_when_read(albef):
    json_path, root = albef
    corrupt = root / "flickr30k-images" / "2.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    dataset = load_captions_json(json_path, root, 32)  # exists, so construction succeeds
    dataset[0]
    with pytest.raises(UserError, match=re.escape(f"image '{corrupt}' listed in {json_path} could not be decoded")):
        dataset[1]


def test_empty_dataset_is_a_user_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(UserError, match="no images to load from " + re.escape(str(path))):
        load_captions_json(path, tmp_path, 32)


# ---- data-spec strings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("synthetic:train", "synthetic:train,n=2000,seed=0"),
        ("synthetic:test", "synthetic:test,n=500,seed=0"),
        ("synthetic:test, seed=4 ,n=0100", "synthetic:test,n=100,seed=4"),
        ("karpathy:/d/dataset_coco.json,split=test,images=/d/coco", "karpathy:/d/dataset_coco.json,images=/d/coco,split=test"),
        ("captions-json:/d/f.json,images=/d/f", "captions-json:/d/f.json,images=/d/f"),
    ],
)
def test_specs_parse_to_a_canonical_string_that_round_trips(text, canonical):
    spec = parse_data_spec(text)
    assert str(spec) == canonical
    assert parse_data_spec(str(spec)) == spec


def test_relative_paths_become_absolute_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_data_spec("captions-json:ann/test.json,images=imgs")
    assert spec.path == str(tmp_path / "ann" / "test.json")
    assert spec.option("images") == str(tmp_path / "imgs")
    assert spec == DataSpec("captions-json", str(tmp_path / "ann" / "test.json"), (("images", str(tmp_path / "imgs")),))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("webdataset:/x", "unknown data kind 'webdataset'.*synthetic, karpathy, captions-json, parquet"),
        ("synthetic", "no kind.*KIND:PATH"),
        ("synthetic:", "no split"),
        ("synthetic:n=5", "no split"),
        ("synthetic:val", "bad split .*'val'.*train or test"),
        ("synthetic:train,size=3", "unknown option 'size'.*allowed options are n, seed"),
        ("synthetic:train,n=abc", "bad value n='abc'.*not an integer"),
        ("synthetic:train,n=0", "bad value n='0'.*at least 1"),
        ("synthetic:train,seed=-2", "bad value seed='-2'"),
        ("synthetic:train,n=3,n=4", "'n' is given twice"),
        ("synthetic:train,n", "'n' .*not key=value"),
        ("karpathy:/d/c.json,split=test", "missing images="),
        ("karpathy:/d/c.json,images=/d", "missing split="),
        ("captions-json:/d/f.json", "missing images="),
        ("captions-json:/d/f.json,images=/d,split=test", "unknown option 'split'.*allowed options are images"),
    ],
)
def test_bad_specs_are_user_errors_naming_the_problem(text, match):
    with pytest.raises(UserError, match=match):
        parse_data_spec(text)


def test_load_dataset_builds_each_kind(karpathy, albef):
    world = load_dataset("synthetic:test,n=4,seed=1", image_size=16)
    assert len(world) == 4 and world[0].image.shape == (3, 16, 16)
    json_path, images = karpathy
    assert len(load_dataset(f"karpathy:{json_path},images={images},split=test", image_size=16)) == 2
    albef_json, root = albef
    assert len(load_dataset(DataSpec("captions-json", str(albef_json), (("images", str(root)),)), 16)) == 2


def test_hand_built_specs_are_validated_when_loaded():
    with pytest.raises(UserError, match="bad value n='-1'"):
        load_dataset(DataSpec("synthetic", "train", (("n", "-1"), ("seed", "0"))), 16)


# ---- caption-count check ----------------------------------------------------------------


def test_check_min_captions_passes_when_every_image_has_enough():
    world = SyntheticWorld("test", 5)
    check_min_captions(world, 5)
    check_min_captions(torch.utils.data.Subset(world, [1, 3]), 1)


def test_check_min_captions_names_the_image_with_fewest(albef, karpathy):
    json_path, root = albef
    with pytest.raises(UserError, match=r"image flickr30k-images/1.jpg has only 2 captions but M=3 .*lower M to <= 2"):
        check_min_captions(load_captions_json(json_path, root, 32), 3)
    with pytest.raises(UserError, match="has only 5 captions but M=6"):
        check_min_captions(SyntheticWorld("train", 3), 6)
    karpathy_json, images = karpathy
    split = load_karpathy(karpathy_json, images, "test", 32)
    with pytest.raises(UserError, match=r"image d.jpg has only 1 captions but M=2"):
        check_min_captions(torch.utils.data.ConcatDataset([split]), 2)


def test_check_min_captions_does_not_decode_images(albef):
    json_path, root = albef
    dataset = load_captions_json(json_path, root, 32)
    for record in dataset.records:
        record.path.write_bytes(b"garbage")  # decoding would now raise
    check_min_captions(dataset, 2)
    with pytest.raises(UserError, match="could not be decoded"):
        dataset[0]
