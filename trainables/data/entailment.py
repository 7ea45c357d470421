"""Visual-entailment pairs (premise image, hypothesis, label) and the SNLI-VE reader in ALBEF's format.

ALBEF's ``ve_{train,dev,test}.json`` (``salesforce/ALBEF:dataset/ve_dataset.py``)::

    [{"image": "2248275918", "sentence": "Two dogs are playing.", "label": "entailment"}, ...]

``image`` is a Flickr30k image id without extension (file ``images / f"{image}.jpg"``; an
id that already ends in ``.jpg`` is used as it is); ``label`` is one of ``entailment``,
``neutral``, ``contradiction``, mapped to ALBEF's indices 2, 1, 0 (the integers 0, 1, 2
are accepted as well). Images are squashed to a square as ALBEF's test transform does
(``trainables/data/squash.py``). Every listed image must exist when the dataset is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from trainables.data.annotations import read_json
from trainables.data.squash import decode_squashed
from trainables.errors import UserError

# ALBEF's label indices (dataset/ve_dataset.py): LABEL_NAMES[index] is the class name.
LABEL_NAMES: tuple[str, ...] = ("contradiction", "neutral", "entailment")
LABELS: dict[str, int] = {name: index for index, name in enumerate(LABEL_NAMES)}
CONTRADICTION, NEUTRAL, ENTAILMENT = LABELS["contradiction"], LABELS["neutral"], LABELS["entailment"]
SNLI_VE_FORMAT = '[{"image": "2248275918", "sentence": "a hypothesis", "label": "entailment"|"neutral"|"contradiction"}, ...]'
_MISSING_SHOWN = 5


@dataclass(frozen=True)
class EntailmentItem:
    """One premise image with one hypothesis.

    Attributes:
        image: float32 (3, H, W) in [0, 1], H = W = the model's image size.
        hypothesis: the sentence to judge against the image.
        label: ALBEF's class index (contradiction 0, neutral 1, entailment 2).
        item_id: unique per dataset (``<image id>#<entry index>`` for SNLI-VE).
        image_id: the premise image's id (several pairs share one image).
    """

    image: torch.Tensor
    hypothesis: str
    label: int
    item_id: str
    image_id: str


@dataclass(frozen=True)
class EntailmentBatch:
    """Collated pairs: images (B, 3, H, W), hypotheses[b], labels (B,) long."""

    images: torch.Tensor
    hypotheses: list[str]
    labels: torch.Tensor
    item_ids: list[str]
    image_ids: list[str]


def collate_entailment(items: list[EntailmentItem]) -> EntailmentBatch:
    """Stack pairs into an :class:`EntailmentBatch` (a DataLoader ``collate_fn``)."""
    return EntailmentBatch(
        images=torch.stack([item.image for item in items]),
        hypotheses=[item.hypothesis for item in items],
        labels=torch.tensor([item.label for item in items], dtype=torch.long),
        item_ids=[item.item_id for item in items],
        image_ids=[item.image_id for item in items],
    )


def only_entailment(dataset: torch.utils.data.Dataset) -> torch.utils.data.Subset:
    """The entailment pairs of a dataset with ``labels`` (MAVA's VE scripts keep only these)."""
    return torch.utils.data.Subset(dataset, [i for i, label in enumerate(dataset.labels) if label == ENTAILMENT])


@dataclass(frozen=True)
class EntailmentRecord:
    """One SNLI-VE entry: image file, hypothesis, label index, ids."""

    path: Path
    hypothesis: str
    label: int
    item_id: str
    image_id: str


def _label_index(value: object, path: Path, index: int) -> int:
    if isinstance(value, str) and value.strip() in LABELS:
        return LABELS[value.strip()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LABEL_NAMES):
        return value
    raise UserError(
        f"entry {index} of {path} has the unknown label {value!r}: SNLI-VE labels are "
        f"{', '.join(repr(name) for name in reversed(LABEL_NAMES))} (or ALBEF's indices 2, 1, 0)"
    )


def _text_field(entry: dict, key: str, path: Path, index: int) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"entry {index} of {path} has no non-empty string '{key}' ({value!r}): the file must look like {SNLI_VE_FORMAT}")
    return value.strip()


def read_snli_ve(json_path: Path, images_dir: Path) -> list[EntailmentRecord]:
    """The pairs of an ALBEF-format SNLI-VE file, checked: labels known, images present, not empty."""
    data = read_json(json_path, "SNLI-VE JSON file (ALBEF's ve_test.json format)")
    if not isinstance(data, list):
        raise UserError(f"{json_path} is a {type(data).__name__}, not a list: an SNLI-VE file looks like {SNLI_VE_FORMAT}")
    if not data:
        raise UserError(f"{json_path} lists no pairs (an empty list): point to a non-empty ve_*.json file")
    if not images_dir.is_dir():
        state = "is not a folder" if images_dir.exists() else "does not exist"
        raise UserError(f"images folder {images_dir} {state}: pass images= the flickr30k-images folder")
    records = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"entry {index} of {json_path} is a {type(entry).__name__}, not an object: the file must look like {SNLI_VE_FORMAT}")
        image_id = _text_field(entry, "image", json_path, index)
        hypothesis = _text_field(entry, "sentence", json_path, index)
        if "label" not in entry:
            raise UserError(f"entry {index} of {json_path} has no 'label': the file must look like {SNLI_VE_FORMAT}")
        label = _label_index(entry["label"], json_path, index)
        filename = image_id if image_id.lower().endswith(".jpg") else f"{image_id}.jpg"
        records.append(EntailmentRecord(images_dir / filename, hypothesis, label, f"{image_id}#{index}", image_id))
    paths = list(dict.fromkeys(record.path for record in records))  # each image checked once
    missing = [path for path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(f"'{path}'" for path in missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise UserError(
            f"{len(missing)} of {len(paths)} premise images of {json_path} do not exist: {shown}{more}: "
            "pass images= the folder holding <image>.jpg for each entry's 'image' id"
        )
    return records


class SnliVeDataset(torch.utils.data.Dataset):
    """SNLI-VE pairs over a Flickr30k image folder, decoded (squashed) on access."""

    def __init__(self, records: Sequence[EntailmentRecord], image_size: int, source: Path):
        self.records = tuple(records)
        self.image_size = image_size
        self.source = source

    @property
    def labels(self) -> list[int]:
        return [record.label for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EntailmentItem:
        record = self.records[index]
        image, _ = decode_squashed(record.path, self.image_size, self.source)
        return EntailmentItem(image, record.hypothesis, record.label, record.item_id, record.image_id)


def load_snli_ve(json_path: Path, images_dir: Path, image_size: int) -> SnliVeDataset:
    """An ALBEF-format SNLI-VE file over ``images_dir`` (the flickr30k-images folder)."""
    return SnliVeDataset(read_snli_ve(Path(json_path), Path(images_dir)), image_size, Path(json_path))
