"""Parquet shards: the converter CLI, the lazy reader, and the round trip to the source files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainables.data import check_min_captions, load_dataset, load_karpathy, write_parquet_shards
from trainables.data.annotations import read_karpathy
from trainables.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_IMAGES = 7


@pytest.fixture(scope="module")
def karpathy_source(tmp_path_factory) -> tuple[Path, Path]:
    """A Karpathy-format file over a folder of JPEG and PNG images of different sizes (COCO-style filepaths)."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    entries = []
    for index in range(NUM_IMAGES):
        folder = "val2014" if index % 2 else "train2014"
        suffix = "png" if index % 3 == 0 else "jpg"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(20 + 3 * index, 28 - index, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / folder / f"img{index}.{suffix}")
        captions = [{"raw": f"caption {k} of image {index}"} for k in range(5 + index % 2)]
        entries.append({"filename": f"img{index}.{suffix}", "filepath": folder, "split": "test" if index < 6 else "train", "sentences": captions})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root / "dataset_coco.json", root / "images"


def test_parquet_round_trip_equals_the_source(karpathy_source, tmp_path):
    json_path, images = karpathy_source
    records = read_karpathy(json_path, images, "test")
    shards = write_parquet_shards(records, tmp_path / "shards", shard_rows=4, row_group_rows=2, progress=False)
    assert [s.name for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.ParquetFile(shards[0]).metadata.num_row_groups == 2

    source = load_karpathy(json_path, images, "test", image_size=16)
    converted = load_dataset(f"parquet:{tmp_path / 'shards'}", image_size=16)
    assert len(converted) == len(source) == 6
    assert converted.caption_records() == source.caption_records()
    for index in [5, 0, 3, 1, 4, 2]:  # out of order: crosses shards and row groups
        expected, found = source[index], converted[index]
        assert found.item_id == expected.item_id and found.captions == expected.captions
        assert torch.equal(found.image, expected.image)  # the stored bytes decode to the very same pixels
    check_min_captions(converted, 5)
    with pytest.raises(UserError, match="has only 5 captions"):
        check_min_captions(converted, 6)
    # DataLoader workers get a pickled copy without open files or cached bytes.
    copy = pickle.loads(pickle.dumps(converted))
    assert torch.equal(copy[2].image, source[2].image)


def test_a_shard_with_another_schema_names_the_file_and_both_schemas(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    table = pa.table({"image": [b"x"], "caption": ["one caption"], "id": ["a"]})
    pq.write_table(table, folder / "part-00000.parquet")
    with pytest.raises(UserError, match=r"part-00000.parquet has schema \(image: binary, caption: string, id: string\) "
                                        r"but Parquet datasets need \(image: binary, captions: list<item: string>, id: string\)"):
        load_dataset(f"parquet:{folder}", image_size=16)


def test_missing_or_empty_folders_and_duplicate_ids_are_refused(karpathy_source, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"parquet:{tmp_path / 'nowhere'}", image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no \*.parquet shards"):
        load_dataset(f"parquet:{tmp_path / 'empty'}", image_size=16)
    json_path, images = karpathy_source
    records = read_karpathy(json_path, images, "test")
    write_parquet_shards(records[:2], tmp_path / "twice" / "a", progress=False)
    write_parquet_shards(records[:2], tmp_path / "twice" / "b", progress=False)
    (tmp_path / "twice" / "b" / "part-00000.parquet").rename(tmp_path / "twice" / "a" / "part-00001.parquet")
    with pytest.raises(UserError, match="appears twice"):
        load_dataset(f"parquet:{tmp_path / 'twice' / 'a'}", image_size=16)
    with pytest.raises(UserError, match="already holds 2 shards"):
        write_parquet_shards(records, tmp_path / "twice" / "a", progress=False)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.data", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_convert_command_writes_shards_that_the_data_spec_reads(karpathy_source, tmp_path):
    json_path, images = karpathy_source
    captions_json = tmp_path / "captions.json"
    captions_json.write_text(json.dumps([{"image": "val2014/img1.jpg", "caption": ["a", "b"]},
                                         {"image": "train2014/img0.png", "caption": "c"},
                                         {"image": "val2014/img1.jpg", "caption": "d"}]))
    result = _run_cli("convert", "--captions-json", str(captions_json), "--images", str(images), "--out", str(tmp_path / "out"),
                      "--shard-size", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"data spec: parquet:{tmp_path / 'out'}" in result.stdout
    dataset = load_dataset(f"parquet:{tmp_path / 'out'}", image_size=8)
    assert dataset.caption_records() == [("val2014/img1.jpg", ("a", "b", "d")), ("train2014/img0.png", ("c",))]

    result = _run_cli("convert", "--karpathy", str(json_path), "--images", str(images), "--out", str(tmp_path / "k"))
    assert result.returncode == 2 and "error: --karpathy needs --split" in result.stderr
