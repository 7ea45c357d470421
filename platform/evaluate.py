"""Robust retrieval evaluation of one model: clean and under each attack × eps, white-box or transfer.

    python -m platform.evaluate --model tiny-clip --data synthetic:test,n=100 \\
        --attacks pgd,apgd,co-attack,sga,vlp-attack --eps 2/255,4/255 --output results.json
    python -m platform.evaluate --model tiny-clip --checkpoint runs/ft/checkpoints/epoch-10 \\
        --surrogate tiny-clip --data synthetic:test --attacks sga --eps 2/255       # transfer

Prints a table (rows: clean and each attack × eps; columns TR@1/5/10, IR@1/5/10, the
threat model and the text-candidate source) and writes the same rows as JSON. Before
the numbers, cheap honesty checks run (fp32, deterministic forward, non-zero input
gradients, more steps never helping the defence, transfer never beating white-box);
each failed check is printed as a warning and stored with the rows (docs/attacks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from platform.cli import attack_names, device_name, eps_list, output_file, positive_int, run_cli
from trainables.attacks import ATTACKS
from trainables.attacks.word_candidates import (EMBEDDED_MLM, WORD_CANDIDATE_FORMS, check_word_candidates, embedded_mlm_problem,
                                                mlm_folder)
from trainables.data import load_dataset, parse_data_spec
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.evaluation.entailment_eval import PAIR_SCOPES
from trainables.evaluation.robustness import (EvalSettings, RetrievalRow, attach_row_warnings, evaluate_retrieval_rows,
                                              honesty_checks)
from trainables.models import ModelSpec, load_model, model_kind, parse_model_spec
from trainables.models.weights import load_strict, read_state_dict
from trainables.names import CLEAN, RECALL_KEYS, VISION_FILE
from trainables.tasks import Task

COLUMNS = {"tr1": "TR@1", "tr5": "TR@5", "tr10": "TR@10", "ir1": "IR@1", "ir5": "IR@5", "ir10": "IR@10"}


def word_candidates_arg(text: str) -> str:
    """argparse type of ``--word-candidates``: a word-source spec (``trainables.attacks.word_candidates``)."""
    try:
        return check_word_candidates(text.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model spec of the evaluated model, e.g. tiny-clip or open_clip:ViT-B-16@/abs/w.pt")
    parser.add_argument("--task", choices=[task.value for task in Task], help="what to evaluate the model on (default: its "
                        "kind's main task; an ALBEF/TCL checkpoint with the head also does entailment or grounding)")
    parser.add_argument("--checkpoint", help="fine-tuned vision weights: a checkpoint directory holding vision.safetensors, or a .safetensors file")
    parser.add_argument("--data", required=True, help="data spec, e.g. synthetic:test,n=100 or karpathy:/data/dataset_flickr30k.json,images=/data/flickr30k,split=test")
    parser.add_argument("--attacks", type=attack_names, default=("pgd",), help=f"comma-separated, from: {', '.join(ATTACKS)} (default: pgd)")
    parser.add_argument("--eps", type=eps_list, default=(2 / 255, 4 / 255), help="comma-separated L-inf budgets in [0, 1] pixel units, e.g. 2/255,4/255 (default)")
    parser.add_argument("--surrogate", help="model spec to craft the attacks on (transfer); default: the evaluated model itself (white-box)")
    parser.add_argument("--surrogate-checkpoint", help="vision weights for the surrogate (same forms as --checkpoint)")
    parser.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per attack batch (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every attack's randomness (default 0)")
    parser.add_argument("--k-test", type=positive_int, default=128, help="candidates an ITM head (BLIP, ALBEF, TCL) re-scores per image and per caption (default 128, Flickr30k's; COCO: 256)")
    parser.add_argument("--word-candidates", type=word_candidates_arg, default=EMBEDDED_MLM,
                        help=f"word source of the text attacks: {WORD_CANDIDATE_FORMS} (default: {EMBEDDED_MLM}, the embedded "
                             "masked LM, for the synthetic world; see docs/attacks.md)")
    parser.add_argument("--pairs", choices=PAIR_SCOPES, default=PAIR_SCOPES[0], help="--task entailment: score all pairs "
                        "(ALBEF's test, the default) or only the entailment pairs (MAVA's VE data)")
    parser.add_argument("--gradcam-layer", type=int, help="--task grounding: the fusion layer whose cross-attention GradCAM reads "
                        "(ALBEF's --block_num; default the model's: layer 8 of 12, scaled to its fusion depth); pick it on a "
                        "validation split")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--no-checks", action="store_true", help="skip the honesty checks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_word_source(word_candidates: str, data: str, attacks: tuple[str, ...]) -> None:
    """``--word-candidates`` against the other arguments, before any model loads: an MLM folder that exists, and
    the embedded MLM only where it applies (its problem, named)."""
    folder = mlm_folder(word_candidates)
    if folder is not None and not folder.is_dir():
        raise UserError(f"--word-candidates: {folder} is not a folder: give a local folder holding a Hugging Face masked LM and its tokenizer")
    problem = embedded_mlm_problem(word_candidates, data, attacks)
    if problem:
        raise UserError(f"--word-candidates: {problem}")


def vision_weights_path(checkpoint: str) -> Path:
    """The vision weights file of a checkpoint directory (``vision.safetensors``) or a weights file itself."""
    path = Path(checkpoint).expanduser().resolve()
    if path.is_dir():
        weights = path / VISION_FILE
        if not weights.is_file():
            raise UserError(f"checkpoint directory {path} has no {VISION_FILE}: give a directory written by the training loop "
                            "or the .safetensors file of the vision weights")
        return weights
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give a checkpoint directory (with {VISION_FILE}) or a .safetensors file")
    return path


def load_evaluated_model(spec: ModelSpec, weights: Path | None, device: torch.device):
    """``load_model(spec)`` with vision weights (if any) loaded strictly into ``model.vision``.

    ``read_state_dict`` checks the weights against the sha256 of a ``card.json`` beside them
    (a published robust checkpoint), so a tampered or truncated file is refused before use.
    """
    model = load_model(spec)
    if weights is not None:
        load_strict(model.vision, read_state_dict(weights), source=str(weights))
    return model.to(device).eval()


def format_table(rows: list[RetrievalRow]) -> str:
    """Rows: clean and each attack × eps; columns TR@1/5/10, IR@1/5/10, threat, text source, scoring (itc or ITM re-ranking)."""
    header = ["attack", "eps"] + list(COLUMNS.values()) + ["threat", "text", "scoring"]
    body = [[row.attack, row.to_json()["eps"] or "-"] + [f"{row.recalls[key]:.1f}" for key in RECALL_KEYS]
            + [row.threat, row.text_source or "-", row.scoring] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    numeric = set(range(2, 2 + len(COLUMNS)))
    render = lambda line: "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule] + [render(line) for line in body])


def labelled_rows(rows: list, check_warnings: list[str], surrogate_checkpoint: str | None, attach: Callable[[list], list]) -> list:
    """Every task's rows as printed and written: the surrogate's weights in each transfer row's threat (so threat
    models never mix), the task's row warnings (``attach``), and the honesty checks' warnings on every attacked row."""
    if surrogate_checkpoint:
        rows = [row if row.threat == "none" else dataclasses.replace(row, threat=f"{row.threat}+{surrogate_checkpoint}")
                for row in rows]
    return [row if row.attack == CLEAN else dataclasses.replace(row, warnings=tuple(check_warnings) + row.warnings)
            for row in attach(rows)]


def chosen_task(args: argparse.Namespace) -> Task:
    """``--task``, checked against what the model's kind does; default its main task. Loads nothing."""
    kind = model_kind(args.model)
    if args.task is None:
        return kind.task
    task = Task(args.task)
    if task not in kind.tasks:
        raise UserError(f"--task {task.value}: model {args.model!r} does {', '.join(t.value for t in kind.tasks)}; "
                        "choose one of those or another model")
    return task


# Tasks other than retrieval: the module of their own evaluation, same arguments (its ``run(args) -> int``);
# imported when chosen, since those modules use this one's helpers.
TASK_RUNNERS: dict[Task, str] = {
    Task.GROUNDING: "platform.evaluate_grounding",
    Task.ENTAILMENT: "platform.evaluate_entailment",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    task = chosen_task(args)
    if args.gradcam_layer is not None and task is not Task.GROUNDING:
        raise UserError(f"--gradcam-layer is for --task grounding (the layer its GradCAM reads), not {task.value}: remove it")
    if task is Task.CAPTIONING:
        raise UserError(f"{args.model!r} is a captioner: evaluate it with python -m platform.evaluate_captions")
    if task is not Task.RETRIEVAL:
        return importlib.import_module(TASK_RUNNERS[task]).run(args)
    return evaluate_retrieval(args)


def evaluate_retrieval(args: argparse.Namespace) -> int:
    """Retrieval recall, clean and under each attack × eps: the table, the warnings and the JSON rows."""
    # Check every input before loading anything: a typo costs no model load.
    device = resolve_device(args.device)
    if args.surrogate_checkpoint and not args.surrogate:
        raise UserError("--surrogate-checkpoint needs --surrogate: name the surrogate's model spec too")
    model_spec = parse_model_spec(args.model)
    surrogate_spec = parse_model_spec(args.surrogate) if args.surrogate else None
    weights = vision_weights_path(args.checkpoint) if args.checkpoint else None
    surrogate_weights = vision_weights_path(args.surrogate_checkpoint) if args.surrogate_checkpoint else None
    data_spec = parse_data_spec(args.data)
    output = output_file(args.output) if args.output else None
    check_word_source(args.word_candidates, args.data, args.attacks)

    model = load_evaluated_model(model_spec, weights, device)
    surrogate = load_evaluated_model(surrogate_spec, surrogate_weights, device) if surrogate_spec else None
    dataset = load_dataset(data_spec, model.image_size)
    if surrogate is not None and surrogate.image_size != model.image_size:
        raise UserError(f"the surrogate takes {surrogate.image_size} px images but the evaluated model {model.image_size} px: "
                        "use a surrogate with the same input size")
    settings = EvalSettings(attacks=args.attacks, eps=args.eps, batch_size=args.batch_size, max_images=args.max_images,
                            seed=args.seed, text_candidates=args.word_candidates, k_test=args.k_test)
    num_images = min(len(dataset), args.max_images or len(dataset))
    threat = "white-box" if surrogate is None else f"transfer from {surrogate.spec}"
    print(f"evaluating {args.model}{' + ' + args.checkpoint if args.checkpoint else ''} on {args.data} "
          f"({num_images} images), attacks {', '.join(args.attacks)}, {threat}", file=sys.stderr)

    warnings = [] if args.no_checks else honesty_checks(model, dataset, settings, surrogate=surrogate)
    rows = evaluate_retrieval_rows(model, dataset, settings, surrogate=surrogate, progress=not args.no_progress)
    rows = labelled_rows(rows, warnings, args.surrogate_checkpoint, attach_row_warnings)

    print(format_table(rows))
    for warning in dict.fromkeys(w for row in rows for w in row.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    if output is not None:
        context = {"model": args.model, "checkpoint": args.checkpoint, "data": args.data, "seed": args.seed}
        output.write_text(json.dumps([{**row.to_json(), **context} for row in rows], indent=2))
        print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
