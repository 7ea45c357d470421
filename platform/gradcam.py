"""GradCAM figures of fusion models, clean and under attack, per vision encoder.

The paper's Figure 5 (visual entailment, the default task):

    python -m platform.gradcam --model tiny-albef-ve \\
        --encoder MAVA=runs/mava/checkpoint --encoder FARE=runs/fare/checkpoint --encoder TeCoA=runs/tecoa/checkpoint \\
        --data synthetic-ve:test,n=300 --attacks co-attack,sga --eps 4/255 --pairs 3 --out figure5.png

Grounding (what the embedded Table 5 counts):

    python -m platform.gradcam --task grounding --model tiny-albef --encoder MAVA=runs/mava/checkpoint \\
        --data synthetic-vg:test,n=150 --attacks pgd,co-attack --eps 4/255 --pairs 4 --out grounding.png

Columns: the undefended model, then each ``--encoder NAME=CHECKPOINT`` (fine-tuned vision
weights swapped into the same model: a checkpoint directory holding vision.safetensors,
or the file). Rows: each pair clean and under each attack, crafted white-box on that
column's encoder. Entailment cells: ALBEF's GradCAM of the true class's logit over the
scored image, the scored hypothesis (replaced words in capitals) and the model's decision
(``trainables.evaluation.gradcam_figure``). Grounding cells: GradCAM of the ITM logit, every
proposal, the chosen one (green: a hit, IoU >= 0.5; red: a miss) and the ground truth
(``trainables.evaluation.grounding_figure``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from platform.cli import attack_names, device_name, eps_list, output_file, parse_assignments, positive_int, run_cli
from platform.evaluate import check_word_source, load_evaluated_model, vision_weights_path, word_candidates_arg
from trainables.attacks.word_candidates import EMBEDDED_MLM, WORD_CANDIDATE_FORMS
from trainables.data import KINDS, load_dataset, parse_data_spec
from trainables.data.entailment import LABELS, EntailmentItem
from trainables.data.grounding import GroundingItem
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.evaluation.entailment_eval import TEXT_ATTACKS_VE, EntailmentSettings, check_entailment_attacks, entailment_candidates
from trainables.evaluation.gradcam_figure import draw_panels, entailment_panels, map_agreement, only_indices
from trainables.evaluation.grounding_eval import GROUNDING_ATTACKS, GroundingSettings, grounding_candidates
from trainables.evaluation.grounding_figure import draw_grounding_panels, grounding_panels
from trainables.models import parse_model_spec
from trainables.names import eps_fraction

UNDEFENDED = "undefended"
TASKS = ("entailment", "grounding")
DEFAULT_ATTACKS = {"entailment": ("co-attack", "sga"), "grounding": ("pgd", "co-attack")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.gradcam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="entailment",
                        help="entailment (the paper's Figure 5, the default) or grounding (GradCAM of the ITM logit and the chosen box)")
    parser.add_argument("--model", required=True,
                        help="an ALBEF/TCL model spec: with cls_head for entailment (e.g. tiny-albef-ve), with an ITM head for "
                             "grounding (e.g. tiny-albef)")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a fine-tuned vision encoder to draw beside the undefended one (repeatable), e.g. MAVA=runs/x/checkpoint")
    parser.add_argument("--data", required=True, help="entailment or grounding data spec, e.g. synthetic-ve:test,n=300 or synthetic-vg:test,n=150")
    parser.add_argument("--attacks", type=attack_names, default=None,
                        help="comma-separated; entailment: from pgd, co-attack, sga (default co-attack,sga, the paper's Figure 5); "
                             "grounding: from pgd, co-attack (default both)")
    parser.add_argument("--eps", type=eps_list, default=(4 / 255,), help="one L-inf budget in [0, 1] pixel units (default 4/255)")
    parser.add_argument("--pairs", type=positive_int, default=3,
                        help="how many pairs (entailment) or expressions (grounding) to draw, the data's first (default 3)")
    parser.add_argument("--label", choices=["entailment", "any"], default="entailment",
                        help="entailment: draw only entailment pairs (MAVA's VE data, the default) or the first pairs of any label")
    parser.add_argument("--gradcam-layer", type=int, default=None,
                        help="grounding: the fusion layer whose cross-attention GradCAM reads (default the model's, as "
                             "platform.evaluate --task grounding)")
    parser.add_argument("--word-candidates", type=word_candidates_arg, default=EMBEDDED_MLM,
                        help=f"word source of the text attacks: {WORD_CANDIDATE_FORMS} (default: {EMBEDDED_MLM})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' randomness (default 0)")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--out", required=True, help="the figure's PNG file")
    return parser


def _check_inputs(args: argparse.Namespace):
    """Every input checked before a model loads: (model spec, {name: weights}, data spec, output path)."""
    if args.attacks is None:
        args.attacks = DEFAULT_ATTACKS[args.task]
    if len(args.eps) != 1:
        raise UserError(f"--eps takes one budget for the figure, got {len(args.eps)}: e.g. --eps 4/255")
    data_spec = parse_data_spec(args.data)
    if args.task == "entailment":
        if KINDS[data_spec.kind].item is not EntailmentItem:
            raise UserError(f"the figure draws visual-entailment pairs, but {args.data!r} is {data_spec.kind} data: "
                            "use e.g. synthetic-ve:test,n=300 or snli-ve:/abs/ve_test.json,images=/abs/flickr30k-images "
                            "(or --task grounding for referring expressions)")
        check_entailment_attacks(args.attacks)
        if args.gradcam_layer is not None:
            raise UserError("--gradcam-layer applies to --task grounding; the entailment figure reads the VE model's layer")
    else:
        if KINDS[data_spec.kind].item is not GroundingItem:
            raise UserError(f"--task grounding draws referring expressions with boxes, but {args.data!r} is {data_spec.kind} "
                            f"data: use e.g. {KINDS['synthetic-vg'].example}")
        unknown = [a for a in args.attacks if a not in GROUNDING_ATTACKS]
        if unknown:
            raise UserError(f"--attacks {','.join(unknown)}: grounding is drawn under {', '.join(GROUNDING_ATTACKS)} "
                            "(SGA needs several captions per image, an expression is one)")
    encoders = parse_assignments(args.encoder, "--encoder")
    if UNDEFENDED in encoders:
        raise UserError(f"--encoder {UNDEFENDED}=...: that column is always drawn (the base model); give the fine-tuned encoder another name")
    weights = {name: vision_weights_path(path) for name, path in encoders.items()}
    check_word_source(args.word_candidates, args.data, args.attacks)
    return parse_model_spec(args.model), weights, data_spec, output_file(args.out, "--out")


def agreement_table(panels) -> str:
    """How much each encoder and attack moves the map: correlation with the undefended clean map, mean ± sd over pairs."""
    lines = [f"map correlation with the {UNDEFENDED} model's clean map (Pearson, mean ± sd over pairs with any evidence)"]
    for (encoder, attack), values in map_agreement(panels, UNDEFENDED).items():
        spread = float(torch.tensor(values).std()) if len(values) > 1 else 0.0
        lines.append(f"  {encoder:>12}  {attack:<10} {sum(values) / len(values):6.2f} ± {spread:.2f}  (n={len(values)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec, weights, data_spec, out = _check_inputs(args)
    device = resolve_device(args.device)
    models = {UNDEFENDED: load_evaluated_model(spec, None, device)}
    draw = _draw_entailment if args.task == "entailment" else _draw_grounding
    figure, panels = draw(args, spec, weights, data_spec, models, device)
    figure.savefig(out)
    print(agreement_table(panels))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _draw_entailment(args, spec, weights, data_spec, models, device):
    if "cls" not in getattr(models[UNDEFENDED], "heads", ()) or not hasattr(models[UNDEFENDED], "entailment_cross_attention"):
        raise UserError(f"{args.model!r} is not a VE fusion model (an ALBEF/TCL checkpoint with cls_head): GradCAM of "
                        "entailment needs one, e.g. tiny-albef-ve")
    models |= {name: load_evaluated_model(spec, path, device) for name, path in weights.items()}
    dataset = load_dataset(data_spec, models[UNDEFENDED].image_size)
    check_entailment_attacks(args.attacks, dataset)
    indices = only_indices(dataset, args.pairs, None if args.label == "any" else LABELS[args.label])
    if not indices:
        raise UserError(f"{args.data!r} has no {args.label} pairs to draw: pass --label any or other data")
    # The text tower is frozen and shared by every encoder: one word source serves all columns.
    settings = EntailmentSettings(attacks=args.attacks, text_candidates=args.word_candidates if set(args.attacks) & TEXT_ATTACKS_VE else None)
    candidates = entailment_candidates(settings, models[UNDEFENDED], dataset, device)
    print(f"drawing GradCAM of {len(indices)} pairs x (clean + {', '.join(args.attacks)}) x {len(models)} encoders", file=sys.stderr)
    panels = entailment_panels(models, dataset, indices, args.attacks, args.eps[0], args.seed, candidates)
    title = (f"GradCAM of the true class's logit, {args.model} (white-box attacks at {eps_fraction(args.eps[0])}, "
             f"words: {args.word_candidates if candidates is not None else 'none'})")
    return draw_panels(panels, title), panels


def _draw_grounding(args, spec, weights, data_spec, models, device):
    base = models[UNDEFENDED]
    if "itm" not in getattr(base, "heads", ()) or not hasattr(base, "itm_cross_attention"):
        raise UserError(f"{args.model!r} cannot ground expressions: grounding needs an ALBEF/TCL checkpoint with an ITM head "
                        "(a retrieval or grounding checkpoint), e.g. tiny-albef")
    models |= {name: load_evaluated_model(spec, path, device) for name, path in weights.items()}
    dataset = load_dataset(data_spec, base.image_size)
    indices = list(range(min(args.pairs, len(dataset))))
    if not indices:
        raise UserError(f"{args.data!r} holds no referring expressions to draw")
    # The text tower is frozen and shared by every encoder: one word source serves all columns.
    settings = GroundingSettings(attacks=args.attacks, text_candidates=args.word_candidates)
    candidates = grounding_candidates(settings, base, device)
    layer = base.gradcam_layer if args.gradcam_layer is None else args.gradcam_layer
    print(f"drawing grounding of {len(indices)} expressions x (clean + {', '.join(args.attacks)}) x {len(models)} encoders, "
          f"GradCAM of fusion layer {layer}", file=sys.stderr)
    panels = grounding_panels(models, dataset, indices, args.attacks, args.eps[0], args.seed, candidates, layer)
    hits = sum(p.hit for p in panels)
    print(f"hits: {hits} of {len(panels)} panels", file=sys.stderr)
    title = (f"Grounding: GradCAM of the ITM logit (fusion layer {layer}), {args.model}\n"
             f"(white-box attacks at {eps_fraction(args.eps[0])}, words: {args.word_candidates if candidates is not None else 'none'})")
    return draw_grounding_panels(panels, title), panels


if __name__ == "__main__":
    run_cli(main)
