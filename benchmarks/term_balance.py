"""How much of MAVA's update does each weighted term drive, in the raw and in the normalised embedding space?

    python benchmarks/term_balance.py [--batches 8] [--train-epochs 1] [--json OUT]

Issue 14, defect 4. On the embedded default (``tiny-clip``, the synthetic train split,
the paper's a, b, c = 0.002, 0.4, 0.6, N = 3, M = 5, PGD 10 steps of 1/255 at eps 2/255,
all TrainConfig defaults) it runs ``trainables.steps.mava_step`` on the first
``--batches`` batches and measures, with ``trainables.steps.term_gradient_norms`` (what
the training loop logs as ``train/gradnorm_*``), the norm of the gradient each weighted
term gives the vision encoder: ``||grad a*L_CMS||``, ``||grad b*L_VSSE||``,
``||grad c*L_SCA||``, and each one's share of their sum. It prints mean and standard
deviation over the batches, for each ``embedding_space`` (raw, normalized), in two
states of the encoder:

- ``start``: the pretrained encoder, as the first batch of epoch 1 sees it. The
  trainable encoder still equals ``F_org``, so L_SCA and its gradient are exactly 0;
- ``after N epochs``: after ``--train-epochs`` epochs of default MAVA training in that
  same space (``run_training``, no evaluation attacks), when F has moved off ``F_org``.

Nothing is downloaded; ``tiny-clip`` comes from the cache (pretrained on first use).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `trainables` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from trainables.config import EmbeddingSpace, TrainConfig  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.data.items import collate  # noqa: E402
from trainables.models import load_model  # noqa: E402
from trainables.models.base import VLPModel  # noqa: E402
from trainables.steps import make_encoders, mava_step, term_gradient_norms  # noqa: E402
from trainables.train import frozen_features, run_training  # noqa: E402

TERMS = ("gradnorm_cms", "gradnorm_vsse", "gradnorm_sca")


def measure(model: VLPModel, config: TrainConfig, batches: int, seed: int) -> list[dict[str, float]]:
    """The three weighted terms' gradient norms on each of the first ``batches`` batches (train mode, as the loop)."""
    dataset = load_dataset(config.train_data, model.image_size)
    cache = frozen_features(model, dataset, config.M, config.batch_size, torch.device("cpu"))
    attack_encode, train_encode = make_encoders(model.vision, model.vision, model.normalize, config)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, collate_fn=collate)
    rows = []
    for index, batch in enumerate(loader):
        if index == batches:
            break
        captions = torch.stack([cache[item_id][0] for item_id in batch.item_ids])
        original = torch.stack([cache[item_id][1] for item_id in batch.item_ids])
        model.vision.train()
        terms = mava_step(attack_encode, train_encode, batch.images, captions, original, config, generator)
        rows.append(term_gradient_norms(terms, config, list(model.vision.parameters())))
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over batches of each norm and of each norm's share of the three's sum."""
    shares = [{f"share_{key.removeprefix('gradnorm_')}": row[key] / sum(row[k] for k in TERMS) for key in TERMS} for row in rows]
    out = {}
    for key in [*TERMS, *shares[0]]:
        values = [row[key] for row in rows] if key in TERMS else [row[key] for row in shares]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--data", default="synthetic:train,n=512")
    parser.add_argument("--batches", type=int, default=8, help="batches measured per state (mean and std over them)")
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of MAVA before the second measurement (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = load_model(args.model)
    base.freeze_text()
    results = {}
    for space in EmbeddingSpace:
        config = TrainConfig(model=args.model, train_data=args.data, eval_data="synthetic:test,n=8", eval_attacks=(),
                             embedding_space=space, epochs=max(1, args.train_epochs), device="cpu", seed=args.seed)
        states = {"start": copy.deepcopy(base)}
        if args.train_epochs > 0:
            trained = copy.deepcopy(base)
            with tempfile.TemporaryDirectory() as folder:
                run_training(config, lambda metrics, checkpoint: None, Path(folder), model=trained)
            states[f"after {args.train_epochs} epoch(s)"] = trained
        for state, model in states.items():
            summary = summarise(measure(model, config, args.batches, args.seed))
            results[f"{space.value} / {state}"] = summary
            print(f"\n{space.value} embeddings, {state} (a, b, c = {config.a:g}, {config.b:g}, {config.c:g}; "
                  f"mean ± std over {args.batches} batches of {config.batch_size}):")
            for key, value in summary.items():
                print(f"  {key:14s} {value['mean']:.4g} ± {value['std']:.2g}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
