"""One fine-tuning run in this process, with the model evaluated before and after.

    python -m platform.finetune --defense mava --epochs 3 --set eps=4/255 --set optimizer=adamw --set lr=1e-4

Prints clean and PGD-robust retrieval recall of the model as loaded, fine-tunes its
vision encoder with the chosen defense (no Ray), evaluates again and writes every
number to ``--out`` (JSON) beside the epoch checkpoints. A captioner (``hf-blip-cap``,
trained with the paper's Eq. 8: ``--set a=0 --set eval_attacks=``) is scored on its
clean captions instead. Sweeps over many settings use ``python -m platform.sweep`` instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from platform.cli import check_writable, parse_assignments, run_cli
from trainables.attacks import ATTACKS
from trainables.config import train_config_from
from trainables.data import check_min_captions, load_dataset, parse_data_spec
from trainables.errors import UserError
from trainables.models import load_model, parse_model_spec
from trainables.names import CLEAN, EPOCH, RESULTS_FILE, TRAIN_PREFIX, eps_fraction, metric_name
from trainables.tasks import Task, task_info
from trainables.train import evaluate_model, run_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-clip", help="model spec (default: tiny-clip, the embedded default)")
    parser.add_argument("--defense", default="mava", help="mava | fare | tecoa")
    parser.add_argument("--train-data", default="synthetic:train,n=512", help="data spec of the fine-tuning set")
    parser.add_argument("--eval-data", default="synthetic:test,n=500", help="data spec of the evaluation set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any training option, e.g. --set eps=4/255 --set N=3")
    parser.add_argument("--out", default="runs/finetune", help="directory for checkpoints and results.json")
    return parser


def table(rows: dict[str, dict[str, float]], attacks: list[tuple[str, float | None]],
          keys: tuple[str, ...] = task_info(Task.RETRIEVAL).summary_keys) -> str:
    """Rows: model state; columns: each of the task's summary keys (TR@1/IR@1, a captioner's BLEU-4/CIDEr) clean and per attack × eps."""
    columns = [(attack, eps, key) for attack, eps in attacks for key in keys]
    header = ["model"] + [f"{CLEAN if eps is None else f'{attack}@{eps_fraction(eps)}'} {key.upper()}" for attack, eps, key in columns]
    lines = [" | ".join(header)]
    for name, metrics in rows.items():
        lines.append(" | ".join([name] + [f"{metrics[metric_name(attack, eps, key)]:.1f}" for attack, eps, key in columns]))
    return "\n".join(lines)


def writable_folder(out: Path) -> Path:
    """``--out``, created if needed; a UserError when it cannot hold checkpoints."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the checkpoints and {RESULTS_FILE}")
    check_writable(out, "--out folder")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = train_config_from({"model": args.model, "defense": args.defense, "train_data": args.train_data,
                                    "eval_data": args.eval_data, "epochs": args.epochs, **parse_assignments(args.set, "--set")}, "command line")
    except UserError as error:
        raise UserError(f"{error}\nfix it on the command line (--defense, --epochs, --set KEY=VALUE); "
                        "trainables/config.py documents every option") from None
    # Every input is checked before the model loads: a typo costs no model load and no evaluation.
    # Parsed once: the loads below use these values (relative paths already absolute).
    model_spec = parse_model_spec(config.model)
    train_spec, eval_spec = parse_data_spec(config.train_data), parse_data_spec(config.eval_data)
    unknown = [name for name in config.eval_attacks if name not in ATTACKS]
    if unknown:
        raise UserError(f"--set eval_attacks: unknown attack {', '.join(map(repr, unknown))}: use some of {', '.join(ATTACKS)}")
    out = writable_folder(Path(args.out).expanduser().resolve())
    model = load_model(model_spec)
    train_set = load_dataset(train_spec, model.image_size)
    if model.has_text_encoder:  # a captioner's training reads no captions
        check_min_captions(train_set, config.M)
    eval_set = load_dataset(eval_spec, model.image_size)
    print(f"evaluating {config.model} as loaded on {config.eval_data} ...")
    before = evaluate_model(model, eval_set, config, progress=True)

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(TRAIN_PREFIX) or k.endswith("/tr1")}
        print(f"epoch {int(metrics[EPOCH])}: {shown} -> {checkpoint}")

    started = time.perf_counter()
    after = run_training(config, report, out / "checkpoints", progress=True, model=model)
    seconds = time.perf_counter() - started
    attacks = [(CLEAN, None)] + [(attack, eps) for attack in config.eval_attacks for eps in config.eval_eps]
    task = config.run_task  # the run's task (an ALBEF/TCL VE checkpoint: --set task=entailment)
    info = task_info(task)
    print(table({"original": before, f"{config.defense.value} fine-tuned": after}, attacks, info.summary_keys))
    results = {"config": config.model_dump(mode="json"), "before": before, "after": after, "train_seconds": seconds}
    # The keys results.json has always had: "recall_keys" for retrieval, "caption_keys" for a captioner.
    key_field = {Task.RETRIEVAL: "recall_keys", Task.CAPTIONING: "caption_keys"}.get(task, f"{task.value}_keys")
    results |= {"threat": "white-box" if info.white_box_eval else CLEAN, key_field: list(info.metric_keys)}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    print(f"wrote {out / RESULTS_FILE} ({seconds:.0f} s of fine-tuning)")
    return 0


if __name__ == "__main__":
    run_cli(main)
