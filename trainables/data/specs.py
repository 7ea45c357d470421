"""Data-spec strings: how users name a dataset in YAML or on the command line.

Syntax: ``KIND:POSITIONAL[,key=value,...]``::

    synthetic:train                      synthetic:test,n=500,seed=0
    karpathy:/data/dataset_coco.json,images=/data/coco,split=test
    captions-json:/data/flickr30k_test.json,images=/data/flickr30k
    parquet:/data/coco-test-parquet      (shards written by ``python -m platform.data convert``)
    synthetic-ve:test,n=600              snli-ve:/data/ve_test.json,images=/data/flickr30k-images
    synthetic-vg:test,n=600              refcoco+:/data/refcoco+_test.json,images=/data/coco,dets=/data/dets.json,refer=/data/refer.json

Most kinds yield :class:`ImageCaptionItem`; the entailment and grounding kinds yield
:class:`EntailmentItem` and :class:`GroundingItem` (``DataKind.item`` says which).

A string is parsed once, at the edge, into a frozen :class:`DataSpec` with every
option present (defaults filled in) and every path absolute (Ray workers run in
other directories); ``str(spec)`` is that canonical string and parses back to an
equal spec. Kinds live in the :data:`KINDS` dict literal below: adding one is one
entry whose ``load`` function lives in its own module (as ``parquet`` does). Paths
may not contain ',' (the option separator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainables.data.annotations import load_captions_json, load_karpathy
from trainables.data.entailment import EntailmentItem, load_snli_ve
from trainables.data.grounding import GroundingItem, load_refcoco
from trainables.data.items import ImageCaptionItem
from trainables.data.parquet import load_parquet
from trainables.data.synthetic import SPLITS, SyntheticWorld
from trainables.data.synthetic_ve import SyntheticEntailment
from trainables.data.synthetic_vg import TEST_SPLITS, SyntheticGrounding
from trainables.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """A parsed, canonical data spec.

    Attributes:
        kind: a key of :data:`KINDS`.
        path: the positional part: an absolute path, or the split name for ``synthetic``.
        options: every option of the kind as (key, canonical value), in the kind's order.
    """

    kind: str
    path: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str) -> str:
        """The value of option ``key`` (all of a kind's options are present after parsing)."""
        for name, value in self.options:
            if name == key:
                return value
        raise KeyError(f"data spec '{self}' has no option {key!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + "".join(f",{key}={value}" for key, value in self.options)


# ---- value checkers: return the canonical string or raise ValueError(reason) -----------


def _absolute_path(text: str) -> str:
    # abspath, not resolve(): keep the user's symlinks, only anchor relative paths here.
    return os.path.abspath(os.path.expanduser(text))


def _positive_int(text: str) -> str:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not an integer") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return str(value)


def _non_negative_int(text: str) -> str:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not an integer") from None
    if value < 0:
        raise ValueError("must be >= 0")
    return str(value)


def _synthetic_split(text: str) -> str:
    if text not in SPLITS:
        raise ValueError(f"not a synthetic split (use {' or '.join(SPLITS)})")
    return text


def _split_names(text: str) -> str:
    names = [name.strip() for name in text.split("+")]
    if not all(names):
        raise ValueError("empty split name (write e.g. test, or train+restval)")
    return "+".join(names)


@dataclass(frozen=True)
class OptionSpec:
    """One ``key=value`` option of a kind.

    Attributes:
        check: text -> canonical text; raises ValueError with the reason it is bad.
        default: positional -> default value text; None makes the option required.
        help: what the value is, for error messages.
    """

    check: Callable[[str], str]
    default: Callable[[str], str] | None
    help: str


@dataclass(frozen=True)
class DataKind:
    """One kind of data spec: its positional part, its options and its loader.

    Attributes:
        positional: what the part after ``KIND:`` is, for error messages.
        check_positional: like :attr:`OptionSpec.check`, for the positional part.
        options: allowed option keys, in canonical order.
        load: (parsed spec, image size in pixels) -> dataset of ``item``.
        example: a valid spec string of this kind.
        item: the item type the dataset yields (what task the data serves).
    """

    positional: str
    check_positional: Callable[[str], str]
    options: dict[str, OptionSpec]
    load: Callable[[DataSpec, int], torch.utils.data.Dataset]
    example: str
    item: type = ImageCaptionItem


_SYNTHETIC_DEFAULT_N = {"train": 2000, "test": 500}


def _load_synthetic(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return SyntheticWorld(spec.path, int(spec.option("n")), image_size=image_size, seed=int(spec.option("seed")))


def _load_karpathy(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return load_karpathy(Path(spec.path), Path(spec.option("images")), spec.option("split"), image_size)


def _load_captions_json(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return load_captions_json(Path(spec.path), Path(spec.option("images")), image_size)


def _load_parquet(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return load_parquet(Path(spec.path), image_size)


def _load_synthetic_ve(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return SyntheticEntailment(spec.path, int(spec.option("n")), image_size=image_size, seed=int(spec.option("seed")))


def _load_synthetic_vg(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return SyntheticGrounding(spec.path, int(spec.option("n")), image_size=image_size, seed=int(spec.option("seed")),
                              resolution=int(spec.option("resolution")))


def _load_snli_ve(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return load_snli_ve(Path(spec.path), Path(spec.option("images")), image_size)


def _load_refcoco(spec: DataSpec, image_size: int) -> torch.utils.data.Dataset:
    return load_refcoco(Path(spec.path), Path(spec.option("images")), Path(spec.option("dets")), Path(spec.option("refer")),
                        spec.option("split"), image_size)


def _grounding_split(text: str) -> str:
    if text not in ("all",) + TEST_SPLITS:
        raise ValueError(f"not a grounding split (use all, {', '.join(TEST_SPLITS)})")
    return text


_SYNTHETIC_VE_DEFAULT_N = {"train": 3000, "test": 600}  # pairs: a third per class
_SYNTHETIC_VG_DEFAULT_N = {"train": 2000, "test": 600}  # scenes: a third per test split
_SEED_OPTION = OptionSpec(_non_negative_int, lambda split: "0", "random seed, an integer >= 0")
_IMAGES_OPTION = OptionSpec(_absolute_path, None, "the folder the image paths in the JSON are relative to")

KINDS: dict[str, DataKind] = {
    "synthetic": DataKind(
        positional="split (train or test)",
        check_positional=_synthetic_split,
        options={
            "n": OptionSpec(_positive_int, lambda split: str(_SYNTHETIC_DEFAULT_N[split]), "number of images, a positive integer"),
            "seed": OptionSpec(_non_negative_int, lambda split: "0", "random seed, an integer >= 0"),
        },
        load=_load_synthetic,
        example="synthetic:test,n=500,seed=0",
    ),
    "karpathy": DataKind(
        positional="path to Karpathy's dataset_coco.json or dataset_flickr30k.json",
        check_positional=_absolute_path,
        options={
            "images": _IMAGES_OPTION,
            "split": OptionSpec(_split_names, None, "train, val, test or restval, or several joined by '+'"),
        },
        load=_load_karpathy,
        example="karpathy:/data/dataset_coco.json,images=/data/coco,split=test",
    ),
    "captions-json": DataKind(
        positional="path to an ALBEF/SGA-style captions JSON list",
        check_positional=_absolute_path,
        options={"images": _IMAGES_OPTION},
        load=_load_captions_json,
        example="captions-json:/data/flickr30k_test.json,images=/data/flickr30k",
    ),
    "parquet": DataKind(
        positional="path to a folder of Parquet shards (part-*.parquet)",
        check_positional=_absolute_path,
        options={},
        load=_load_parquet,
        example="parquet:/data/coco-test-parquet",
    ),
    "synthetic-ve": DataKind(
        positional="split (train or test)",
        check_positional=_synthetic_split,
        options={
            "n": OptionSpec(_positive_int, lambda split: str(_SYNTHETIC_VE_DEFAULT_N[split]), "number of image-hypothesis pairs, a positive integer"),
            "seed": _SEED_OPTION,
        },
        load=_load_synthetic_ve,
        example="synthetic-ve:test,n=600,seed=0",
        item=EntailmentItem,
    ),
    "synthetic-vg": DataKind(
        positional="split (train or test)",
        check_positional=_synthetic_split,
        options={
            "n": OptionSpec(_positive_int, lambda split: str(_SYNTHETIC_VG_DEFAULT_N[split]), "number of scenes (one expression each), a positive integer"),
            "seed": _SEED_OPTION,
            "resolution": OptionSpec(_positive_int, lambda split: "64", "side in pixels of the original image the boxes are in"),
        },
        load=_load_synthetic_vg,
        example="synthetic-vg:test,n=600,seed=0",
        item=GroundingItem,
    ),
    "snli-ve": DataKind(
        positional="path to ALBEF's ve_test.json (or ve_dev/ve_train)",
        check_positional=_absolute_path,
        options={"images": OptionSpec(_absolute_path, None, "the flickr30k-images folder holding <image>.jpg")},
        load=_load_snli_ve,
        example="snli-ve:/data/ve_test.json,images=/data/flickr30k-images",
        item=EntailmentItem,
    ),
    "refcoco+": DataKind(
        positional="path to ALBEF's refcoco+_val.json or refcoco+_test.json",
        check_positional=_absolute_path,
        options={
            "images": OptionSpec(_absolute_path, None, "the COCO folder the 'image' paths are relative to"),
            "dets": OptionSpec(_absolute_path, None, "ALBEF's refcoco+/dets.json proposals"),
            "refer": OptionSpec(_absolute_path, None, "the REFER export written by python -m platform.data convert --refer"),
            "split": OptionSpec(_grounding_split, lambda path: "all", "all, val, testA or testB"),
        },
        load=_load_refcoco,
        example="refcoco+:/data/refcoco+_test.json,images=/data/coco,dets=/data/dets.json,refer=/data/refer.json",
        item=GroundingItem,
    ),
}

_SYNTAX = "KIND:PATH[,key=value,...]"


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``KIND:POSITIONAL[,key=value,...]`` into a canonical :class:`DataSpec`.

    Raises:
        UserError: unknown kind or option, missing required option, bad value; the
            message names the offending part and lists what is allowed.
    """
    kinds = ", ".join(KINDS)
    kind_name, colon, rest = text.partition(":")
    kind_name = kind_name.strip()
    if not colon:
        raise UserError(f"data spec '{text}' has no kind: write {_SYNTAX} with KIND one of {kinds}, e.g. synthetic:train")
    if kind_name not in KINDS:
        raise UserError(f"unknown data kind '{kind_name}' in data spec '{text}': valid kinds are {kinds}")
    kind = KINDS[kind_name]
    positional, *items = [part.strip() for part in rest.split(",")]
    if not positional or "=" in positional:
        raise UserError(f"data spec '{text}' has no {kind.positional} after '{kind_name}:': write e.g. {kind.example}")
    try:
        positional = kind.check_positional(positional)
    except ValueError as reason:
        raise UserError(f"bad {kind.positional} '{positional}' in data spec '{text}': {reason}; e.g. {kind.example}") from None

    given: dict[str, str] = {}
    for item in items:
        if not item:
            continue  # tolerate a trailing or doubled comma
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals:
            raise UserError(f"option '{item}' in data spec '{text}' is not key=value: write e.g. {kind.example}")
        if key not in kind.options:
            allowed = ", ".join(kind.options) or "none"
            raise UserError(f"unknown option '{key}' for data kind '{kind_name}' in data spec '{text}': allowed options are {allowed}")
        if key in given:
            raise UserError(f"option '{key}' is given twice in data spec '{text}': keep one")
        option = kind.options[key]
        try:
            given[key] = option.check(value)
        except ValueError as reason:
            raise UserError(f"bad value {key}='{value}' in data spec '{text}': {reason} ({key}: {option.help}); write e.g. {kind.example}") from None

    options = []
    for key, option in kind.options.items():
        if key in given:
            options.append((key, given[key]))
        elif option.default is None:
            raise UserError(f"data spec '{text}' is missing {key}= ({option.help}): write e.g. {kind.example}")
        else:
            options.append((key, option.default(positional)))
    return DataSpec(kind=kind_name, path=positional, options=tuple(options))


def load_dataset(spec: str | DataSpec, image_size: int) -> torch.utils.data.Dataset:
    """The dataset a spec names, yielding :class:`ImageCaptionItem` of ``image_size`` pixels.

    A :class:`DataSpec` built by hand is re-parsed from its string, so it is validated too.
    """
    parsed = parse_data_spec(spec if isinstance(spec, str) else str(spec))
    return KINDS[parsed.kind].load(parsed, image_size)


# ---- caption-count check ----------------------------------------------------------------


def _caption_records(dataset: torch.utils.data.Dataset) -> list[tuple[str, tuple[str, ...]]]:
    """(item_id, captions) per item; datasets with ``caption_records()`` skip image decoding."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = _caption_records(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [record for part in dataset.datasets for record in _caption_records(part)]
    if hasattr(dataset, "caption_records"):
        return dataset.caption_records()
    # Fallback for any other dataset: reads (and decodes) every item once.
    return [(item.item_id, item.captions) for item in (dataset[i] for i in range(len(dataset)))]


def check_min_captions(dataset: torch.utils.data.Dataset, m: int) -> None:
    """Raise a UserError if any image has fewer than ``m`` captions (M captions per image).

    The message names the image with the fewest captions, so "lower M to <= K" is a fix
    that works for the whole dataset.
    """
    if m < 1:
        raise UserError(f"M={m} captions per image were requested: M must be at least 1")
    records = _caption_records(dataset)
    short = [(len(captions), item_id) for item_id, captions in records if len(captions) < m]
    if short:
        fewest, item_id = min(short)
        others = f" ({len(short)} images have fewer than {m})" if len(short) > 1 else ""
        raise UserError(
            f"image {item_id} has only {fewest} captions but M={m} captions per image were requested{others}: "
            f"lower M to <= {fewest} or drop such images"
        )
