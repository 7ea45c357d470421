"""Visual-grounding items (image, referring expression, box, proposals, split) and the RefCOCO+ reader.

RefCOCO+ comes as ALBEF ships it (``salesforce/ALBEF:configs/Grounding.yaml``):

* ``refcoco+_{val,test}.json``: ``[{"image": "train2014/COCO_train2014_000000581857.jpg", "text": "...", "ref_id": 1}, ...]``
  (image path relative to ``images=``; the test file holds testA and testB);
* ``dets.json``: detector proposals ``{"<image_id>": [[x, y, w, h, ...], ...]}`` (only the first 4 read);
* the REFER annotations as JSON, written once from ``refs(unc).p`` + ``instances.json`` by
  ``python -m platform.data convert --refer ... --instances ... --out refer.json``
  (``trainables/data/refer_pickle.py``): ``{"format": "mava-refer/1", "refs": {"<ref_id>":
  {"split": "testA", "image_id": 1, "bbox": [x, y, w, h]}}, "images": {"<image_id>": {"height": h, "width": w}}}``.

Boxes and proposals stay in original-image pixels; the image is squashed to the model's
square (ALBEF's test transform) so the GradCAM grid covers it all, and
``original_size`` says what to upsample the map to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from trainables.data.annotations import read_json
from trainables.data.squash import decode_squashed
from trainables.errors import UserError

REFER_FORMAT = "mava-refer/1"
REFCOCO_FORMAT = '[{"image": "train2014/COCO_train2014_000000581857.jpg", "text": "an expression", "ref_id": 1}, ...]'
_SHOWN = 5


@dataclass(frozen=True)
class GroundingItem:
    """One referring expression on one image.

    Attributes:
        image: float32 (3, H, W) in [0, 1] at the model's size (the whole image, squashed).
        expression: the referring expression.
        box: ground-truth ``(x, y, w, h)`` in original-image pixels.
        proposals: candidate boxes ``(x, y, w, h)``, original pixels; the prediction is one of them.
        split: ``val``, ``testA``, ``testB`` (or ``train``).
        item_id: the ref id (unique per dataset).
        image_id: the image's id (several expressions share an image).
        original_size: (height, width) of the original image, what the map is upsampled to.
    """

    image: torch.Tensor
    expression: str
    box: tuple[float, ...]
    proposals: tuple[tuple[float, ...], ...]
    split: str
    item_id: str
    image_id: str
    original_size: tuple[int, int]


@dataclass(frozen=True)
class GroundingBatch:
    """Collated items: images (B, 3, H, W); the rest per item (proposal counts differ)."""

    images: torch.Tensor
    expressions: list[str]
    boxes: list[tuple[float, ...]]
    proposals: list[tuple[tuple[float, ...], ...]]
    splits: list[str]
    item_ids: list[str]
    image_ids: list[str]
    original_sizes: list[tuple[int, int]]


def collate_grounding(items: list[GroundingItem]) -> GroundingBatch:
    """Stack items into a :class:`GroundingBatch` (a DataLoader ``collate_fn``)."""
    return GroundingBatch(
        images=torch.stack([item.image for item in items]),
        expressions=[item.expression for item in items],
        boxes=[item.box for item in items],
        proposals=[item.proposals for item in items],
        splits=[item.split for item in items],
        item_ids=[item.item_id for item in items],
        image_ids=[item.image_id for item in items],
        original_sizes=[item.original_size for item in items],
    )


@dataclass(frozen=True)
class GroundingRecord:
    """One RefCOCO+ expression with everything but the pixels."""

    path: Path
    expression: str
    box: tuple[float, ...]
    proposals: tuple[tuple[float, ...], ...]
    split: str
    item_id: str
    image_id: str
    original_size: tuple[int, int]


def _box(value: Any) -> tuple[float, ...] | None:
    """The first four numbers of a box list, or None if it is not one."""
    if not isinstance(value, (list, tuple)) or len(value) < 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:4]):
        return None
    return tuple(float(v) for v in value[:4])


def _more(items: list, shown: int = _SHOWN) -> str:
    text = ", ".join(str(item) for item in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def read_refer_export(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(refs, images) of a REFER export written by ``platform.data convert --refer``."""
    data = read_json(path, f"REFER export ({REFER_FORMAT}, written by python -m platform.data convert --refer)")
    if not isinstance(data, dict) or data.get("format") != REFER_FORMAT or not isinstance(data.get("refs"), dict) \
            or not isinstance(data.get("images"), dict):
        raise UserError(
            f"{path} is not a REFER export ({REFER_FORMAT}): write one from refs(unc).p and instances.json with "
            "python -m platform.data convert --refer 'refs(unc).p' --instances instances.json --out refer.json"
        )
    return data["refs"], data["images"]


def _check_entry(entry: Any, index: int, json_path: Path) -> None:
    fields_ok = isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("text"), str) \
        and isinstance(entry.get("ref_id"), int)
    if not fields_ok:
        raise UserError(f"entry {index} of {json_path} is not {{'image': str, 'text': str, 'ref_id': int}}: "
                        f"the file must look like {REFCOCO_FORMAT}")


def _check_ref(ref: Any, ref_id: int, refer_path: Path) -> None:
    if not isinstance(ref, dict) or _box(ref.get("bbox")) is None or not isinstance(ref.get("split"), str) or "image_id" not in ref:
        raise UserError(f"ref {ref_id} in {refer_path} is not {{'split', 'image_id', 'bbox': [x, y, w, h]}}: re-run the convert command")


def read_refcoco(json_path: Path, images_dir: Path, dets_path: Path, refer_path: Path) -> list[GroundingRecord]:
    """The expressions of an ALBEF ``refcoco+_*.json`` joined with proposals and REFER annotations."""
    entries = read_json(json_path, "ALBEF refcoco+_*.json file")
    if not isinstance(entries, list):
        raise UserError(f"{json_path} is a {type(entries).__name__}, not a list: it must look like {REFCOCO_FORMAT}")
    if not entries:
        raise UserError(f"{json_path} lists no referring expressions (an empty list): point to refcoco+_val.json or refcoco+_test.json")
    dets = read_json(dets_path, "ALBEF dets.json proposals file")
    if not isinstance(dets, dict):
        raise UserError(f"{dets_path} is a {type(dets).__name__}, not an object: dets.json maps image ids to [[x, y, w, h], ...]")
    refs, images = read_refer_export(refer_path)
    if not images_dir.is_dir():
        raise UserError(f"images folder {images_dir} does not exist or is not a folder: "
                        "pass images= the folder the 'image' paths are relative to")
    records, unknown, no_dets = [], [], []
    for index, entry in enumerate(entries):
        _check_entry(entry, index, json_path)
        ref_id = entry["ref_id"]
        ref = refs.get(str(ref_id))
        if ref is None:
            unknown.append(ref_id)
            continue
        _check_ref(ref, ref_id, refer_path)
        image_id = str(ref["image_id"])
        if not dets.get(image_id):
            no_dets.append(image_id)
            continue
        boxes = tuple(_box(p) for p in dets[image_id])
        if any(b is None for b in boxes):
            raise UserError(f"dets.json entry of image {image_id} in {dets_path} holds something that is not an [x, y, w, h, ...] box")
        size = images.get(image_id)
        if not isinstance(size, dict) or not all(isinstance(size.get(k), int) for k in ("height", "width")):
            raise UserError(f"image {image_id} (ref {ref_id}) has no height/width in {refer_path}: "
                            "re-run the convert command with the matching instances.json")
        records.append(GroundingRecord(images_dir / entry["image"], entry["text"].strip(), _box(ref["bbox"]), boxes,
                                       ref["split"], str(ref_id), image_id, (size["height"], size["width"])))
    if unknown:
        raise UserError(f"{len(unknown)} ref_ids of {json_path} are not in {refer_path} ({_more(unknown)}): "
                        "export the REFER annotations of the same dataset (refcoco+, unc)")
    if no_dets:
        unique = sorted(set(no_dets))
        raise UserError(f"{len(unique)} images of {json_path} have no proposals in {dets_path} ({_more(unique)}): "
                        "use the dets.json of the same dataset")
    missing = [str(p) for p in dict.fromkeys(r.path for r in records) if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images of {json_path} do not exist ({_more(missing)}): "
                        "pass images= the folder the 'image' paths are relative to")
    return records


def filter_split(records: Sequence[GroundingRecord], split: str) -> list[GroundingRecord]:
    """Records of one split (``all`` keeps every record)."""
    if split == "all":
        return list(records)
    kept = [r for r in records if r.split == split]
    if not kept:
        present = sorted({r.split for r in records})
        raise UserError(f"no referring expressions of split '{split}': the file holds {', '.join(present)}; use split=all or one of those")
    return kept


class RefcocoDataset(torch.utils.data.Dataset):
    """RefCOCO+ expressions over the COCO image folder, decoded (squashed) on access."""

    def __init__(self, records: Sequence[GroundingRecord], image_size: int, source: Path):
        self.records, self.image_size, self.source = tuple(records), image_size, source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> GroundingItem:
        r = self.records[index]
        image, size = decode_squashed(r.path, self.image_size, self.source)
        if size != r.original_size:
            raise UserError(
                f"image '{r.path}' is {size[0]}x{size[1]} (height x width) but the REFER export says {r.original_size[0]}x{r.original_size[1]}: "
                "boxes would be misplaced; use the images and instances.json of the same COCO release"
            )
        return GroundingItem(image, r.expression, r.box, r.proposals, r.split, r.item_id, r.image_id, r.original_size)


def load_refcoco(json_path: Path, images_dir: Path, dets_path: Path, refer_path: Path, split: str, image_size: int) -> RefcocoDataset:
    """An ALBEF ``refcoco+_*.json`` (one split or all) with its proposals and REFER export."""
    records = read_refcoco(Path(json_path), Path(images_dir), Path(dets_path), Path(refer_path))
    return RefcocoDataset(filter_split(records, split), image_size, Path(json_path))
