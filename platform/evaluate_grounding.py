"""Weakly supervised visual grounding of one model, clean and under attack: ``platform.evaluate --task grounding``.

    python -m platform.evaluate --task grounding --model albef:/models/bert@/ckpt/refcoco.pth \\
        --data refcoco+:/data/refcoco+_test.json,images=/data/coco,dets=/data/dets.json,refer=/data/refer.json \\
        --attacks pgd,co-attack --eps 2/255,4/255 --output grounding.json
    python -m platform.evaluate --task grounding --model albef:DIR@FILE --data synthetic-vg:test,n=300 \\
        --surrogate albef:DIR@OTHER --attacks pgd                                          # transfer

Prints a table (rows: clean and each attack × eps; columns: accuracy over all expressions
and per split, the threat model, the text source) with the chance and largest-box
baselines, and writes the rows as JSON. ``run(args)`` receives ``platform.evaluate``'s
parsed arguments (``--max-images`` caps referring expressions). docs/grounding.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from platform.evaluate import labelled_rows, load_evaluated_model, vision_weights_path
from platform.cli import output_file
from trainables.attacks.word_candidates import embedded_mlm_problem
from trainables.data import load_dataset, parse_data_spec
from trainables.data.grounding import GroundingItem
from trainables.data.specs import KINDS
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.evaluation.grounding_eval import (GROUNDING_ATTACKS, GroundingRow, GroundingSettings, attach_grounding_warnings,
                                                  evaluate_grounding_rows, grounding_baselines, grounding_honesty_checks)
from trainables.models import parse_model_spec
from trainables.names import GROUNDING_KEYS
from trainables.tasks import Task

COLUMNS = {"acc": "acc", "acc_val": "val", "acc_testA": "testA", "acc_testB": "testB"}


def format_grounding_table(rows: list[GroundingRow]) -> str:
    """Rows: clean and each attack × eps; columns: accuracy (all, per split present), threat, text source."""
    keys = [key for key in GROUNDING_KEYS if any(key in row.accuracy for row in rows)]
    header = ["attack", "eps"] + [COLUMNS[key] for key in keys] + ["threat", "text"]
    body = [[row.attack, row.to_json()["eps"] or "-"] + [f"{row.accuracy[key]:.1f}" if key in row.accuracy else "-" for key in keys]
            + [row.threat, row.text_source or "-"] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    numeric = set(range(2, 2 + len(keys)))
    render = lambda line: "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(line) for line in body])


def run(args: argparse.Namespace) -> int:
    """Grounding accuracy, clean and under each attack × eps: the table, baselines, warnings and JSON rows."""
    # Check every input before loading anything: a typo costs no model load.
    device = resolve_device(args.device)
    unknown = [a for a in args.attacks if a not in GROUNDING_ATTACKS]
    if unknown:
        raise UserError(f"--attacks {','.join(unknown)}: grounding is evaluated under {', '.join(GROUNDING_ATTACKS)} "
                        "(SGA needs several captions per image, an expression is one)")
    if args.surrogate_checkpoint and not args.surrogate:
        raise UserError("--surrogate-checkpoint needs --surrogate: name the surrogate's model spec too")
    model_spec = parse_model_spec(args.model)
    surrogate_spec = parse_model_spec(args.surrogate) if args.surrogate else None
    weights = vision_weights_path(args.checkpoint) if args.checkpoint else None
    surrogate_weights = vision_weights_path(args.surrogate_checkpoint) if args.surrogate_checkpoint else None
    data_spec = parse_data_spec(args.data)
    if KINDS[data_spec.kind].item is not GroundingItem:
        grounding_kinds = ", ".join(f"{name}:" for name, kind in KINDS.items() if kind.item is GroundingItem)
        raise UserError(f"--data {args.data}: --task grounding needs referring expressions with boxes ({grounding_kinds}), "
                        f"e.g. {KINDS['synthetic-vg'].example}")
    output = output_file(args.output) if args.output else None
    mlm_problem = embedded_mlm_problem(args.word_candidates, args.data, args.attacks)
    if mlm_problem:
        raise UserError(f"--word-candidates: {mlm_problem}")

    model = load_evaluated_model(model_spec, weights, device)
    surrogate = load_evaluated_model(surrogate_spec, surrogate_weights, device) if surrogate_spec else None
    if surrogate is not None and surrogate.image_size != model.image_size:
        raise UserError(f"the surrogate takes {surrogate.image_size} px images but the evaluated model {model.image_size} px: "
                        "use a surrogate with the same input size")
    dataset = load_dataset(data_spec, model.image_size)
    settings = GroundingSettings(attacks=args.attacks, eps=args.eps, batch_size=args.batch_size, max_items=args.max_images,
                                 seed=args.seed, layer=args.gradcam_layer, text_candidates=args.word_candidates)
    layer = model.gradcam_layer if args.gradcam_layer is None else args.gradcam_layer
    baselines = grounding_baselines(dataset, args.max_images)
    threat = "white-box" if surrogate is None else f"transfer from {surrogate.spec}"
    print(f"grounding {args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {args.data} "
          f"({baselines.items} expressions), attacks {', '.join(args.attacks)}, {threat}, GradCAM of fusion layer {layer}",
          file=sys.stderr)

    warnings = [] if args.no_checks else grounding_honesty_checks(model, dataset, settings, surrogate=surrogate)
    rows = evaluate_grounding_rows(model, dataset, settings, surrogate=surrogate, progress=not args.no_progress)
    rows = labelled_rows(rows, warnings, args.surrogate_checkpoint, attach_grounding_warnings)

    print(format_grounding_table(rows))
    print(f"baselines: chance {baselines.chance:.1f} (a random proposal; {baselines.mean_proposals:.1f} proposals per "
          f"expression), largest box {baselines.largest_box:.1f}")
    for warning in dict.fromkeys(w for row in rows for w in row.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    if output is not None:
        context = {"model": args.model, "checkpoint": args.checkpoint, "data": args.data, "seed": args.seed,
                   "task": Task.GROUNDING.value, "gradcam_layer": layer, "baselines": dataclasses.asdict(baselines)}
        output.write_text(json.dumps([{**row.to_json(), **context} for row in rows], indent=2))
        print(f"wrote {output}", file=sys.stderr)
    return 0
