"""Captioning evaluation of one captioner, clean and under a cross-task transfer attack (paper, Table 8).

    python -m platform.evaluate_captions --model hf-blip-cap:/models/blip-image-captioning-base \\
        --data karpathy:/data/coco/dataset_coco.json,images=/data/coco,split=test --max-images 1000
    python -m platform.evaluate_captions --model hf-blip-cap:/models/blip-cap --checkpoint runs/ft/epoch-0010 \\
        --data captions-json:/data/coco_test.json,images=/data/coco --attack pgd --eps 2/255 \\
        --surrogate hf-blip-itr:/models/blip-itm-base-coco --output captions.json

Captioning models have no text encoder, so an attack is crafted on a *retrieval*
surrogate (the paper uses ALBEF) and its adversarial images are then captioned.
Prints BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where its jars are present;
offline it is reported unavailable, with a note) for the clean images and each eps,
and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from platform.cli import device_name, eps_list, output_file, positive_int, run_cli
from platform.evaluate import load_evaluated_model, vision_weights_path
from trainables.attacks import ATTACKS
from trainables.data import load_dataset, parse_data_spec
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.evaluation.captioning import CaptionEvalSettings, evaluate_captioning
from trainables.models import MODEL_KINDS, model_kind, parse_model_spec
from trainables.names import CAPTION_KEYS, CLEAN, eps_fraction, eps_label
from trainables.tasks import Task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.evaluate_captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="captioning model spec, e.g. hf-blip-cap:/models/blip-image-captioning-base")
    parser.add_argument("--checkpoint", help="fine-tuned vision weights: a checkpoint directory holding vision.safetensors, or a .safetensors file")
    parser.add_argument("--data", required=True, help="data spec; every caption of an image is a reference")
    parser.add_argument("--attack", choices=sorted(ATTACKS), help="attack crafted on --surrogate (omit for clean captions only)")
    parser.add_argument("--eps", type=eps_list, default=(2 / 255,), help="comma-separated budgets, e.g. 2/255 (Table 8's; default)")
    parser.add_argument("--surrogate", help="retrieval model spec the attack runs on (required with --attack)")
    parser.add_argument("--surrogate-checkpoint", help="vision weights for the surrogate")
    parser.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument("--num-beams", type=positive_int, default=3, help="beam search width (BLIP's COCO evaluation: 3)")
    parser.add_argument("--max-length", type=positive_int, default=20, help="caption length limit in tokens (default 20)")
    parser.add_argument("--min-length", type=positive_int, default=5, help="minimum caption length in tokens (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's randomness (default 0)")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--output", help="write the metrics, notes and threat model as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def format_table(metrics: dict[str, float], runs: list[tuple[str, float | None]]) -> str:
    """Rows: clean and the attack at each eps; columns the caption metrics (``-`` where unavailable)."""
    header = ["images", "eps"] + [key.upper() if key != "rouge_l" else "ROUGE-L" for key in CAPTION_KEYS]
    lines = [header]
    for attack, eps in runs:
        prefix = CLEAN if attack == CLEAN else f"{attack}/{eps_label(eps)}"
        lines.append([attack, eps_fraction(eps) if eps is not None else "-"]
                     + [f"{metrics[f'{prefix}/{key}']:.1f}" if f"{prefix}/{key}" in metrics else "-" for key in CAPTION_KEYS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.attack and not args.surrogate:
        raise UserError(f"--attack {args.attack} needs --surrogate: captioners have no text encoder, so the attack is crafted "
                        "on a retrieval model (e.g. --surrogate hf-blip-itr:/models/blip-itm-base-coco) and then captioned")
    if args.surrogate and not args.attack:
        raise UserError("--surrogate was given without --attack: name the attack to craft on it, e.g. --attack pgd")
    if args.surrogate_checkpoint and not args.surrogate:
        raise UserError("--surrogate-checkpoint needs --surrogate: name the surrogate's model spec too")
    model_spec = parse_model_spec(args.model)
    if Task.CAPTIONING not in model_kind(model_spec).tasks:
        captioners = [kind for kind, info in MODEL_KINDS.items() if Task.CAPTIONING in info.tasks]
        raise UserError(f"{args.model} is not a captioning model: use a spec of kind {' or '.join(captioners)} "
                        "(retrieval models are evaluated with python -m platform.evaluate)")
    surrogate_spec = parse_model_spec(args.surrogate) if args.surrogate else None
    weights = vision_weights_path(args.checkpoint) if args.checkpoint else None
    surrogate_weights = vision_weights_path(args.surrogate_checkpoint) if args.surrogate_checkpoint else None
    data_spec = parse_data_spec(args.data)
    output = output_file(args.output) if args.output else None

    model = load_evaluated_model(model_spec, weights, device)
    surrogate = load_evaluated_model(surrogate_spec, surrogate_weights, device) if surrogate_spec else None
    dataset = load_dataset(data_spec, model.image_size)
    settings = CaptionEvalSettings(eps=args.eps, batch_size=args.batch_size, max_images=args.max_images, seed=args.seed,
                                   max_length=args.max_length, min_length=args.min_length, num_beams=args.num_beams)
    result = evaluate_captioning(model, dataset, attack=args.attack, surrogate=surrogate, settings=settings,
                                 progress=not args.no_progress)
    runs = [(CLEAN, None)] + [(args.attack, eps) for eps in args.eps if args.attack]
    print(f"captioning {args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {args.data}; "
          f"threat model: {result.threat_model}")
    print(format_table(result.metrics, runs))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if output is not None:
        output.write_text(json.dumps({"model": args.model, "checkpoint": args.checkpoint, "data": args.data,
                                      "threat": result.threat_model, "metrics": result.metrics, "notes": list(result.notes)},
                                     indent=2))
        print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
