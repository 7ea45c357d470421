"""Image-caption data: the synthetic world, annotation-file datasets and data-spec strings.

Datasets yield :class:`ImageCaptionItem` with images in [0, 1] (not normalised); the
entailment and grounding kinds yield ``EntailmentItem`` / ``GroundingItem`` instead
(``KINDS[kind].item``). ``load_dataset("synthetic:train", image_size=32)`` is the usual entry point.
"""

from trainables.data.annotations import AnnotatedImageDataset, ImageRecord, load_captions_json, load_karpathy
from trainables.data.items import Batch, ImageCaptionItem, collate
from trainables.data.parquet import ParquetImageCaptions, load_parquet, write_parquet_shards
from trainables.data.specs import KINDS, DataKind, DataSpec, OptionSpec, check_min_captions, load_dataset, parse_data_spec
from trainables.data.synthetic import SyntheticWorld, describe

__all__ = [
    "KINDS",
    "AnnotatedImageDataset",
    "Batch",
    "DataKind",
    "DataSpec",
    "ImageCaptionItem",
    "ImageRecord",
    "OptionSpec",
    "ParquetImageCaptions",
    "SyntheticWorld",
    "check_min_captions",
    "collate",
    "describe",
    "load_captions_json",
    "load_dataset",
    "load_karpathy",
    "load_parquet",
    "parse_data_spec",
    "write_parquet_shards",
]
