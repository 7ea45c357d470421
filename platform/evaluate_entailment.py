"""Visual-entailment evaluation of one model: accuracy clean and under each attack × eps, white-box or transfer.

    python -m platform.evaluate --task entailment --model albef:/abs/bert@/abs/ve.pth \\
        --data synthetic-ve:test,n=300 --attacks pgd,co-attack,sga --eps 2/255,4/255 --output r.json
    python -m platform.evaluate --task entailment --model tcl:/abs/bert@/abs/tcl-ve.pth \\
        --surrogate albef:/abs/bert@/abs/ve.pth --data snli-ve:/abs/ve_test.json,images=/abs/flickr30k-images \\
        --attacks pgd --eps 2/255                                                   # transfer (Table 7)

``platform.evaluate`` dispatches here (``TASK_RUNNERS``) with its parsed arguments. Prints a table
(accuracy, correct / total, per-class correct counts, threat model, which pairs, word source) and
writes the same rows as JSON; honesty checks run first (``trainables.evaluation.entailment_eval``).
``--pairs entailment`` scores only the entailment pairs (MAVA's VE data); the default scores all
pairs, as ALBEF's test does. ``--max-images`` caps the number of pairs.
"""

from __future__ import annotations

import argparse
import json
import sys

from platform.cli import output_file
from platform.evaluate import check_word_source, labelled_rows, load_evaluated_model, vision_weights_path
from trainables.data import KINDS, load_dataset, parse_data_spec
from trainables.data.entailment import LABEL_NAMES, EntailmentItem
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.evaluation.entailment_eval import (ACCURACY, TEXT_ATTACKS_VE, EntailmentRow, EntailmentSettings, attach_entailment_warnings,
                                                   check_entailment_attacks, entailment_honesty_checks, evaluate_entailment_rows)
from trainables.models import parse_model_spec
from trainables.tasks import Task

def format_table(rows: list[EntailmentRow]) -> str:
    """Rows: clean and each attack × eps; columns accuracy, correct/total, per-class correct/total, threat, pairs, text."""
    header = ["attack", "eps", ACCURACY, "correct"] + [name[:13] for name in reversed(LABEL_NAMES)] + ["threat", "pairs", "text"]
    body = []
    for row in rows:
        counts = [f"{row.score.per_class[name].correct}/{row.score.per_class[name].total}" for name in reversed(LABEL_NAMES)]
        body.append([row.attack, row.to_json()["eps"] or "-", f"{row.accuracy:.1f}", f"{row.score.correct}/{row.score.total}",
                     *counts, row.threat, row.pairs, row.text_source or "-"])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    numeric = set(range(2, 4 + len(LABEL_NAMES)))
    render = lambda line: "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(line) for line in body])


def _check_inputs(args: argparse.Namespace):
    """Every input checked before a model is loaded (a typo costs no load); returns the parsed pieces."""
    if args.surrogate_checkpoint and not args.surrogate:
        raise UserError("--surrogate-checkpoint needs --surrogate: name the surrogate's model spec too")
    data_spec = parse_data_spec(args.data)
    if KINDS[data_spec.kind].item is not EntailmentItem:
        entailment_kinds = ", ".join(name for name, kind in KINDS.items() if kind.item is EntailmentItem)
        raise UserError(f"--task entailment needs entailment pairs, but {args.data!r} is {data_spec.kind} data: "
                        f"use one of {entailment_kinds} (e.g. synthetic-ve:test,n=300)")
    check_entailment_attacks(args.attacks)
    check_word_source(args.word_candidates, args.data, args.attacks)
    return (parse_model_spec(args.model), parse_model_spec(args.surrogate) if args.surrogate else None,
            vision_weights_path(args.checkpoint) if args.checkpoint else None,
            vision_weights_path(args.surrogate_checkpoint) if args.surrogate_checkpoint else None, data_spec,
            output_file(args.output) if args.output else None)


def run(args: argparse.Namespace) -> int:
    """Entailment accuracy, clean and under each attack × eps: the table, the warnings and the JSON rows."""
    device = resolve_device(args.device)
    model_spec, surrogate_spec, weights, surrogate_weights, data_spec, output = _check_inputs(args)
    model = load_evaluated_model(model_spec, weights, device)
    if "cls" not in getattr(model, "heads", ()):
        raise UserError(f"{args.model!r} has no visual-entailment head (cls_head): give an ALBEF/TCL VE checkpoint")
    surrogate = load_evaluated_model(surrogate_spec, surrogate_weights, device) if surrogate_spec else None
    if surrogate is not None and surrogate.image_size != model.image_size:
        raise UserError(f"the surrogate takes {surrogate.image_size} px images but the evaluated model {model.image_size} px: "
                        "use a surrogate with the same input size")
    dataset = load_dataset(data_spec, model.image_size)
    pairs = getattr(args, "pairs", "all")
    settings = EntailmentSettings(attacks=args.attacks, eps=args.eps, batch_size=args.batch_size, max_pairs=args.max_images,
                                  seed=args.seed, pairs=pairs,
                                  text_candidates=args.word_candidates if set(args.attacks) & TEXT_ATTACKS_VE else None)
    threat = "white-box" if surrogate is None else f"transfer from {surrogate.spec}"
    print(f"evaluating entailment of {args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {args.data} "
          f"({pairs} pairs), attacks {', '.join(args.attacks) or 'none'}, {threat}", file=sys.stderr)

    warnings = [] if args.no_checks else entailment_honesty_checks(model, dataset, settings, surrogate=surrogate)
    rows = evaluate_entailment_rows(model, dataset, settings, surrogate=surrogate, progress=not args.no_progress)
    rows = labelled_rows(rows, warnings, args.surrogate_checkpoint, attach_entailment_warnings)

    print(format_table(rows))
    for warning in dict.fromkeys(w for row in rows for w in row.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    if output is not None:
        context = {"task": Task.ENTAILMENT.value, "model": args.model, "checkpoint": args.checkpoint, "data": args.data, "seed": args.seed}
        output.write_text(json.dumps([{**row.to_json(), **context} for row in rows], indent=2))
        print(f"wrote {output}", file=sys.stderr)
    return 0
