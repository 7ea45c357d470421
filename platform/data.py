"""``python -m platform.data``: convert image-caption datasets to Parquet shards.

    python -m platform.data convert --karpathy dataset_coco.json --images /data/coco --split test --out /data/coco-test-parquet
    python -m platform.data convert --captions-json flickr30k_test.json --images /data/flickr30k --out /data/f30k-test-parquet

Shards (``part-00000.parquet``, ...) hold each image's encoded bytes, its captions and
its id (schema in ``trainables/data/parquet.py``); use them with the data spec
``parquet:/data/coco-test-parquet``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from platform.cli import run_cli
from trainables.data.annotations import read_captions_json, read_karpathy
from trainables.data.parquet import ROW_GROUP_ROWS, SHARD_ROWS, load_parquet, write_parquet_shards
from trainables.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write Parquet shards from a Karpathy JSON or a captions JSON over an image folder")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--karpathy", type=Path, metavar="JSON", help="Karpathy dataset_coco.json / dataset_flickr30k.json (needs --split)")
    source.add_argument("--captions-json", type=Path, metavar="JSON", help="ALBEF/SGA-style captions list")
    convert.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder the JSON's image paths are relative to")
    convert.add_argument("--split", help="Karpathy split: train, val, test, restval, or several joined by '+'")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the shards (must not hold shards yet)")
    convert.add_argument("--shard-size", type=int, default=SHARD_ROWS, metavar="N", help=f"images per shard (default {SHARD_ROWS})")
    convert.add_argument("--row-group-size", type=int, default=ROW_GROUP_ROWS, metavar="N",
                         help=f"images per row group, the unit one image read loads (default {ROW_GROUP_ROWS})")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def convert(args: argparse.Namespace) -> int:
    """Read the annotation file, write the shards, and read them back once as a check."""
    if args.karpathy is not None:
        if not args.split:
            raise UserError("--karpathy needs --split (e.g. --split test): Karpathy files hold every split")
        records = read_karpathy(args.karpathy.resolve(), args.images.resolve(), args.split)
    else:
        if args.split:
            raise UserError("--split applies to --karpathy only: a captions JSON file is already one split; drop --split")
        records = read_captions_json(args.captions_json.resolve(), args.images.resolve())
    shards = write_parquet_shards(records, args.out.resolve(), args.shard_size, args.row_group_size,
                                  total=len(records), progress=not args.no_progress)
    dataset = load_parquet(args.out.resolve(), image_size=1)  # re-reads the index: schema and ids check
    captions = sum(len(c) for _, c in dataset.caption_records())
    print(f"wrote {len(dataset)} images ({captions} captions) in {len(shards)} shards to {args.out.resolve()}")
    print(f"data spec: parquet:{args.out.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"convert": convert}
    return commands[args.command](args)


if __name__ == "__main__":
    run_cli(main)
