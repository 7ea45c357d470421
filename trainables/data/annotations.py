"""Image-caption datasets over an image folder, from the two annotation formats in use.

* **Karpathy** (``dataset_coco.json``, ``dataset_flickr30k.json``)::

      {"images": [{"filename": "x.jpg", "filepath": "val2014", "split": "test",
                   "sentences": [{"raw": "A caption ."}, ...]}, ...], "dataset": "coco"}

  Image path = images_dir / filepath / filename (``filepath`` is COCO-only).
* **Captions list** (ALBEF, SGA, Co-Attack per-split files)::

      [{"image": "flickr30k-images/1007129816.jpg", "caption": ["...", "..."]}, ...]

  Image path = images_dir / image; ``caption`` is a list, or one string in their train
  files, where an image repeats once per caption: entries of the same image are merged.

Every listed image is checked to exist when the dataset is built (so a wrong
``images=`` fails before training starts); images are decoded lazily per item.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from trainables.data.image_folder import decode_image
from trainables.data.items import ImageCaptionItem
from trainables.errors import UserError

KARPATHY_FORMAT = (
    '{"images": [{"filename": "x.jpg", "filepath": "val2014" (optional), "split": "test", '
    '"sentences": [{"raw": "a caption"}, ...]}, ...]}'
)
CAPTIONS_FORMAT = '[{"image": "folder/x.jpg", "caption": ["a caption", ...] or "a caption"}, ...]'
_MISSING_SHOWN = 5  # missing image paths quoted in the error; the rest are counted


@dataclass(frozen=True)
class ImageRecord:
    """One image of an annotation file: where it is, its captions, and its id.

    Attributes:
        path: absolute path of the image file.
        captions: every caption of the image, whitespace-stripped.
        item_id: the image path relative to the images folder (posix), unique per dataset.
    """

    path: Path
    captions: tuple[str, ...]
    item_id: str


class AnnotatedImageDataset(torch.utils.data.Dataset):
    """Image-caption records decoded on access to (3, image_size, image_size) floats in [0, 1].

    Args:
        records: the images; must be non-empty and every path must exist.
        image_size: side length of the returned images.
        source: the annotation file the records came from (quoted in error messages).
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int, source: Path):
        if not records:
            raise UserError(
                f"no images to load from {source}: check that the annotation file lists images (in the split you selected)"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        missing = [record.path for record in records if not record.path.exists()]
        if missing:
            shown = ", ".join(f"'{path}'" for path in missing[:_MISSING_SHOWN])
            more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
            raise UserError(
                f"{len(missing)} of {len(records)} images listed in {source} do not exist: {shown}{more}: "
                "check that images= is the folder these paths are relative to, or remove the entries"
            )
        self.records: tuple[ImageRecord, ...] = tuple(records)
        self.image_size = image_size
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageCaptionItem:
        record = self.records[index]
        return ImageCaptionItem(
            image=decode_image(record.path, self.image_size, self.source),
            captions=record.captions,
            item_id=record.item_id,
        )

    def caption_records(self) -> list[tuple[str, tuple[str, ...]]]:
        """(item_id, captions) of every item, without decoding images (for caption checks)."""
        return [(record.item_id, record.captions) for record in self.records]


# ---- reading JSON ---------------------------------------------------------------------


def read_json(path: Path, what: str) -> Any:
    """Parse ``path`` as JSON, with UserErrors naming the file (``what`` says what it should be)."""
    if not path.exists():
        raise UserError(f"annotation file {path} does not exist: check the path to the {what}")
    if not path.is_file():
        raise UserError(f"annotation file {path} is not a file: give the path of the {what} itself")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(
            f"annotation file {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}): "
            f"fix the file or point to the right {what}"
        ) from error
    except UnicodeDecodeError as error:
        raise UserError(f"annotation file {path} is not UTF-8 text ({error}): point to the {what}") from error


def _check_images_dir(images_dir: Path) -> None:
    if not images_dir.is_dir():
        state = "is not a folder" if images_dir.exists() else "does not exist"
        raise UserError(
            f"images folder {images_dir} {state}: pass images= the folder that the annotation's image paths are relative to"
        )


def _bad_entry(path: Path, index: int, problem: str, fmt: str) -> UserError:
    return UserError(f"entry {index} of {path} {problem}: the file must look like {fmt}")


def _string_field(entry: Any, key: str, path: Path, index: int, fmt: str) -> str:
    if not isinstance(entry, dict):
        raise _bad_entry(path, index, f"is a {type(entry).__name__}, not an object", fmt)
    if key not in entry:
        raise _bad_entry(path, index, f"has no '{key}' field", fmt)
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise _bad_entry(path, index, f"has a '{key}' field that is not a non-empty string ({value!r})", fmt)
    return value.strip()


def _merge_by_image(records: list[ImageRecord]) -> list[ImageRecord]:
    """Merge records of the same image (first-appearance order), concatenating captions."""
    merged: dict[str, ImageRecord] = {}
    for record in records:
        seen = merged.get(record.item_id)
        if seen is not None:
            record = ImageRecord(seen.path, seen.captions + record.captions, seen.item_id)
        merged[record.item_id] = record
    return list(merged.values())


# ---- the two formats ------------------------------------------------------------------


def read_karpathy(json_path: Path, images_dir: Path, split: str) -> list[ImageRecord]:
    """Records of ``split`` in a Karpathy file; ``split`` may join names with '+' (``train+restval``)."""
    data = read_json(json_path, "Karpathy dataset_*.json file")
    if isinstance(data, list):
        raise UserError(
            f"{json_path} is a list, not Karpathy's {{\"images\": [...]}} object: "
            "it looks like a captions list, use captions-json: instead of karpathy:"
        )
    if not isinstance(data, dict) or "images" not in data:
        raise UserError(f"{json_path} has no top-level 'images' field: a Karpathy file looks like {KARPATHY_FORMAT}")
    entries = data["images"]
    if not isinstance(entries, list):
        raise UserError(
            f"'images' in {json_path} is a {type(entries).__name__}, not a list: a Karpathy file looks like {KARPATHY_FORMAT}"
        )
    wanted = [name.strip() for name in split.split("+")]
    present: Counter[str] = Counter()
    records = []
    for index, entry in enumerate(entries):
        entry_split = _string_field(entry, "split", json_path, index, KARPATHY_FORMAT)
        present[entry_split] += 1
        if entry_split not in wanted:
            continue
        filename = _string_field(entry, "filename", json_path, index, KARPATHY_FORMAT)
        # filepath is COCO-only (train2014/val2014); Flickr30k keeps all images in one folder.
        relative = Path(filename)
        if "filepath" in entry:
            relative = Path(_string_field(entry, "filepath", json_path, index, KARPATHY_FORMAT)) / filename
        if "sentences" not in entry:
            raise _bad_entry(json_path, index, "has no 'sentences' field", KARPATHY_FORMAT)
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            problem = f"has a 'sentences' field that is not a non-empty list ({sentences!r})"
            raise _bad_entry(json_path, index, problem, KARPATHY_FORMAT)
        captions = tuple(_string_field(sentence, "raw", json_path, index, KARPATHY_FORMAT) for sentence in sentences)
        records.append(ImageRecord(images_dir / relative, captions, relative.as_posix()))
    absent = [name for name in wanted if name not in present]
    if absent:
        listing = ", ".join(f"{name} ({count} images)" for name, count in sorted(present.items())) or "none"
        raise UserError(f"split '{'+'.join(absent)}' is not in {json_path}; splits present: {listing}: pass split= one of them")
    _check_images_dir(images_dir)
    return _merge_by_image(records)


def read_captions_json(json_path: Path, images_dir: Path) -> list[ImageRecord]:
    """Records of an ALBEF/SGA-style captions list; repeated images are merged."""
    data = read_json(json_path, "captions JSON file (ALBEF/SGA format)")
    if isinstance(data, dict) and "images" in data:
        raise UserError(
            f"{json_path} is a Karpathy-format object, not a captions list: "
            f"use karpathy:{json_path},images=...,split=... instead of captions-json:"
        )
    if not isinstance(data, list):
        raise UserError(f"{json_path} is a {type(data).__name__}, not a list: a captions file looks like {CAPTIONS_FORMAT}")
    records = []
    for index, entry in enumerate(data):
        relative = Path(_string_field(entry, "image", json_path, index, CAPTIONS_FORMAT))
        if "caption" not in entry:
            raise _bad_entry(json_path, index, "has no 'caption' field", CAPTIONS_FORMAT)
        caption = entry["caption"]
        raw = [caption] if isinstance(caption, str) else caption
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and c.strip() for c in raw):
            problem = f"has a 'caption' that is neither a non-empty string nor a non-empty list of them ({caption!r})"
            raise _bad_entry(json_path, index, problem, CAPTIONS_FORMAT)
        records.append(ImageRecord(images_dir / relative, tuple(c.strip() for c in raw), relative.as_posix()))
    _check_images_dir(images_dir)
    return _merge_by_image(records)


def load_karpathy(json_path: Path, images_dir: Path, split: str, image_size: int) -> AnnotatedImageDataset:
    """The ``split`` of a Karpathy ``dataset_*.json`` over ``images_dir``."""
    return AnnotatedImageDataset(read_karpathy(Path(json_path), Path(images_dir), split), image_size, Path(json_path))


def load_captions_json(json_path: Path, images_dir: Path, image_size: int) -> AnnotatedImageDataset:
    """An ALBEF/SGA-style captions list over ``images_dir``."""
    return AnnotatedImageDataset(read_captions_json(Path(json_path), Path(images_dir)), image_size, Path(json_path))
