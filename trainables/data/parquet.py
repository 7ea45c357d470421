"""Image-caption data as Parquet shards (pyarrow): writing them, and reading them lazily.

A dataset is a folder of shards ``part-00000.parquet``, ``part-00001.parquet``, ...
with one row per image and exactly this schema (:data:`SCHEMA`)::

    image     binary          the image file's encoded bytes (JPEG/PNG as on disk, not re-encoded)
    captions  list<string>    every caption of the image
    id        string          unique per dataset (the image path relative to the images folder)

Reading (data spec ``parquet:/abs/dir``) never holds the images decoded in memory:
opening the folder reads only the ``id`` and ``captions`` columns to build an index
of (shard, row); an item reads the ``image`` column of its row group only, and keeps
the last few row groups' bytes so sequential reads (evaluation, a shard-ordered
sampler) read each row group once. Random access reads one row group per item, so
shards are written with small row groups (:data:`ROW_GROUP_ROWS`).
"""

from __future__ import annotations

import io
import os
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from trainables.data.annotations import ImageRecord
from trainables.data.image_folder import _DECODE_ERRORS, pil_to_tensor, resize_center_crop
from trainables.data.items import ImageCaptionItem
from trainables.errors import UserError

SCHEMA = pa.schema([("image", pa.binary()), ("captions", pa.list_(pa.string())), ("id", pa.string())])
SHARD_PATTERN = "part-{:05d}.parquet"
SHARD_ROWS = 1000  # images per shard (the CLI's --shard-size default)
ROW_GROUP_ROWS = 64  # images per row group: the unit an item read decodes from disk
_CACHED_ROW_GROUPS = 4  # per process (each DataLoader worker has its own)


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"shard {path} is not a readable Parquet file ({type(error).__name__}: {error}): "
                        "re-convert the dataset with `python -m platform.data convert`, or remove the file") from None


def _check_schema(path: Path, schema: pa.Schema) -> None:
    # Names and types must match; field order and nullability do not matter.
    if {f.name: f.type for f in schema} != {f.name: f.type for f in SCHEMA}:
        raise UserError(
            f"shard {path} has schema ({_schema_text(schema)}) but Parquet datasets need ({_schema_text(SCHEMA)}): "
            "write the shards with `python -m platform.data convert`"
        )


class ParquetImageCaptions(torch.utils.data.Dataset):
    """The images of a folder of Parquet shards, decoded on access to (3, image_size, image_size) in [0, 1].

    Args:
        directory: folder holding ``*.parquet`` shards (read in sorted name order).
        image_size: side length of the returned images (shorter side resized, centre crop).
    """

    def __init__(self, directory: Path, image_size: int):
        directory = Path(directory)
        if not directory.is_dir():
            state = "is not a folder" if directory.exists() else "does not exist"
            raise UserError(f"Parquet folder {directory} {state}: write one with `python -m platform.data convert ... --out {directory}`")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.shards: tuple[Path, ...] = tuple(sorted(directory.glob("*.parquet")))
        if not self.shards:
            raise UserError(f"Parquet folder {directory} holds no *.parquet shards: write them with `python -m platform.data convert ... --out {directory}`")
        self.directory = directory
        self.image_size = image_size
        ids: list[str] = []
        captions: list[tuple[str, ...]] = []
        # Per shard: its first global row, and the first row of each of its row groups.
        self._shard_starts: list[int] = []
        self._group_starts: list[list[int]] = []
        first_shard: dict[str, Path] = {}
        for shard in self.shards:
            parquet = _open_shard(shard)
            _check_schema(shard, parquet.schema_arrow)
            self._shard_starts.append(len(ids))
            starts, row = [], 0
            for group in range(parquet.metadata.num_row_groups):
                starts.append(row)
                row += parquet.metadata.row_group(group).num_rows
            self._group_starts.append(starts)
            try:
                table = parquet.read(columns=["id", "captions"])
            except (pa.ArrowException, OSError) as error:
                raise UserError(f"shard {shard} could not be read ({type(error).__name__}: {error}): re-convert the dataset") from None
            for item_id, item_captions in zip(table.column("id").to_pylist(), table.column("captions").to_pylist()):
                if item_id is None or not item_captions:
                    raise UserError(f"shard {shard} has a row with no id or no captions (id {item_id!r}): re-convert the dataset")
                if item_id in first_shard:
                    raise UserError(f"id {item_id!r} appears twice, in {first_shard[item_id]} and {shard}: ids must be unique; re-convert the dataset")
                first_shard[item_id] = shard
                ids.append(item_id)
                captions.append(tuple(item_captions))
        self.ids: tuple[str, ...] = tuple(ids)
        self.captions: tuple[tuple[str, ...], ...] = tuple(captions)
        self._open: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()

    def __getstate__(self) -> dict:
        # Open files and cached bytes stay in their process (DataLoader workers, Ray).
        state = self.__dict__.copy()
        state["_open"], state["_groups"] = {}, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def _image_bytes(self, index: int) -> tuple[bytes, Path]:
        shard = bisect_right(self._shard_starts, index) - 1
        row = index - self._shard_starts[shard]
        group = bisect_right(self._group_starts[shard], row) - 1
        key = (shard, group)
        if key not in self._groups:
            if shard not in self._open:
                self._open[shard] = pq.ParquetFile(self.shards[shard])
            self._groups[key] = self._open[shard].read_row_group(group, columns=["image"]).column("image").to_pylist()
            if len(self._groups) > _CACHED_ROW_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][row - self._group_starts[shard][group]], self.shards[shard]

    def __getitem__(self, index: int) -> ImageCaptionItem:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a Parquet dataset of {len(self)} images")
        index %= len(self)
        data, shard = self._image_bytes(index)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")  # forces the full decode inside the try
        except _DECODE_ERRORS as error:
            raise UserError(
                f"image {self.ids[index]!r} in shard {shard} could not be decoded ({type(error).__name__}: {error}): "
                "re-convert the dataset from the source images"
            ) from error
        return ImageCaptionItem(
            image=pil_to_tensor(resize_center_crop(image, self.image_size)),
            captions=self.captions[index],
            item_id=self.ids[index],
        )

    def caption_records(self) -> list[tuple[str, tuple[str, ...]]]:
        """(item_id, captions) of every item, from the index (no image is read)."""
        return list(zip(self.ids, self.captions))


def load_parquet(directory: Path, image_size: int) -> ParquetImageCaptions:
    """The Parquet dataset in ``directory`` (entry point of the ``parquet:`` data spec)."""
    return ParquetImageCaptions(Path(directory), image_size)


# ---- writing -------------------------------------------------------------------------------


def _read_image_file(record: ImageRecord) -> bytes:
    """The encoded bytes of a record's image, after checking PIL can identify them."""
    if not record.path.is_file():
        raise UserError(f"image {record.path} (id {record.item_id}) does not exist: check --images, or remove the entry")
    data = record.path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.verify()  # header and structure check, cheaper than a full decode
    except _DECODE_ERRORS as error:
        raise UserError(f"image {record.path} (id {record.item_id}) is not a readable image ({type(error).__name__}: {error}): fix or remove it") from error
    return data


def _write_shard(path: Path, rows: list[tuple[bytes, tuple[str, ...], str]], row_group_rows: int) -> None:
    table = pa.table(
        {"image": [r[0] for r in rows], "captions": [list(r[1]) for r in rows], "id": [r[2] for r in rows]},
        schema=SCHEMA,
    )
    # Write under a temporary name so a reader never sees half a shard.
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial, row_group_size=row_group_rows)
    os.replace(partial, path)


def write_parquet_shards(records: Iterable[ImageRecord], out_dir: Path, shard_rows: int = SHARD_ROWS,
                         row_group_rows: int = ROW_GROUP_ROWS, total: int | None = None, progress: bool = True) -> list[Path]:
    """Write ``records`` as ``out_dir/part-00000.parquet``, ...; returns the shard paths.

    Image files are stored as their encoded bytes, so decoding a shard's image gives
    exactly the pixels of decoding the source file. ``out_dir`` may exist but must not
    already hold shards (old and new shards would mix into one dataset).
    """
    if shard_rows < 1 or row_group_rows < 1:
        raise UserError(f"shard size {shard_rows} and row group size {row_group_rows} must be at least 1: pass --shard-size and --row-group-size of 1 or more")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a folder for the shards")
    existing = sorted(out_dir.glob("*.parquet")) if out_dir.is_dir() else []
    if existing:
        raise UserError(f"--out {out_dir} already holds {len(existing)} shards (e.g. {existing[0].name}): remove them or choose another folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out_dir} cannot be created ({error.strerror or error}): choose a writable folder") from None
    shards: list[Path] = []
    rows: list[tuple[bytes, tuple[str, ...], str]] = []
    seen: set[str] = set()
    for record in tqdm(records, total=total, desc=f"writing Parquet shards to {out_dir}", unit="image", disable=not progress):
        if record.item_id in seen:
            raise UserError(f"id {record.item_id!r} appears twice in the source: ids must be unique")
        seen.add(record.item_id)
        rows.append((_read_image_file(record), record.captions, record.item_id))
        if len(rows) == shard_rows:
            shards.append(out_dir / SHARD_PATTERN.format(len(shards)))
            _write_shard(shards[-1], rows, row_group_rows)
            rows = []
    if rows:
        shards.append(out_dir / SHARD_PATTERN.format(len(shards)))
        _write_shard(shards[-1], rows, row_group_rows)
    if not shards:
        raise UserError("the source lists no images: check the annotation file (and --split)")
    return shards
