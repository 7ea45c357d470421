"""``python -m platform.data``: convert image-caption datasets to Parquet shards, REFER to JSON.

    python -m platform.data convert --karpathy dataset_coco.json --images /data/coco --split test --out /data/coco-test-parquet
    python -m platform.data convert --captions-json flickr30k_test.json --images /data/flickr30k --out /data/f30k-test-parquet
    python -m platform.data convert --refer 'refs(unc).p' --instances instances.json --out /data/refer.json

Shards (``part-00000.parquet``, ...) hold each image's encoded bytes, its captions and
its id (schema in ``trainables/data/parquet.py``); use them with the data spec
``parquet:/data/coco-test-parquet``. ``--refer`` reads REFER's pickle with a restricted
unpickler (plain containers, strings and numbers only) and writes the JSON that the
``refcoco+:...,refer=/data/refer.json`` data spec reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from platform.cli import run_cli
from trainables.data.annotations import read_captions_json, read_karpathy
from trainables.data.parquet import ROW_GROUP_ROWS, SHARD_ROWS, load_parquet, write_parquet_shards
from trainables.data.refer_pickle import write_refer_export
from trainables.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="write Parquet shards from a Karpathy JSON or a captions JSON over an image folder")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--karpathy", type=Path, metavar="JSON", help="Karpathy dataset_coco.json / dataset_flickr30k.json (needs --split)")
    source.add_argument("--captions-json", type=Path, metavar="JSON", help="ALBEF/SGA-style captions list")
    source.add_argument("--refer", type=Path, metavar="PICKLE", help="REFER's refs(unc).p (needs --instances; --out is a JSON file)")
    convert.add_argument("--instances", type=Path, metavar="JSON", help="REFER's instances.json, with --refer")
    convert.add_argument("--images", type=Path, metavar="DIR", help="folder the JSON's image paths are relative to (not with --refer)")
    convert.add_argument("--split", help="Karpathy split: train, val, test, restval, or several joined by '+'")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the shards (must not hold shards yet)")
    convert.add_argument("--shard-size", type=int, default=SHARD_ROWS, metavar="N", help=f"images per shard (default {SHARD_ROWS})")
    convert.add_argument("--row-group-size", type=int, default=ROW_GROUP_ROWS, metavar="N",
                         help=f"images per row group, the unit one image read loads (default {ROW_GROUP_ROWS})")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def convert(args: argparse.Namespace) -> int:
    """Read the annotation file, write the shards, and read them back once as a check."""
    if args.refer is not None:
        return convert_refer(args)
    if args.instances is not None:
        raise UserError("--instances goes with --refer only: drop it, or convert REFER annotations with --refer 'refs(unc).p'")
    if args.images is None:
        raise UserError("--images is required with --karpathy and --captions-json: pass the folder the JSON's image paths are relative to")
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


def convert_refer(args: argparse.Namespace) -> int:
    """Export REFER's refs pickle + instances.json as the JSON ``refcoco+:`` reads."""
    if args.instances is None:
        raise UserError("--refer needs --instances instances.json (the COCO-style file next to refs(unc).p)")
    if args.images is not None or args.split:
        raise UserError("--images and --split do not apply to --refer: drop them")
    export = write_refer_export(args.refer.resolve(), args.instances.resolve(), args.out.resolve())
    splits = sorted({ref["split"] for ref in export["refs"].values()})
    print(f"wrote {len(export['refs'])} refs on {len(export['images'])} images (splits: {', '.join(splits)}) to {args.out.resolve()}")
    print(f"data spec: refcoco+:/path/refcoco+_test.json,images=/path/coco,dets=/path/dets.json,refer={args.out.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"convert": convert}
    return commands[args.command](args)


if __name__ == "__main__":
    run_cli(main)
