"""MLflow records of sweeps written without Ray or training: the sweep's own tracker, fed made-up results.

``log_sweep`` creates the parent run with the params ``platform.sweep.run_sweep`` gives it
and drives ``platform.tracking.MlflowTrialTracker`` (the Tune callback that writes every
trial's child run) with stand-in Tune trials, so the tags, params and per-epoch metric
history are the ones a real sweep records; only the metric values are invented. Metric
names come from ``trainables.names``, as the training loop's evaluation spells them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mlflow.tracking import MlflowClient

from platform.tracking import MlflowTrialTracker, get_or_create_experiment, get_or_create_parent_run
from trainables.config import TrainConfig
from trainables.evaluation.uncertainty import QueryRanks, write_ranks
from trainables.names import (ALWAYS_COMPUTED_CAPTION_KEYS, CHECKPOINT_PATH_KEY, CLEAN, RANKS_FILE, RECALL_KEYS, STATE_FILE,
                              VISION_FILE, metric_name, train_metric)

CAPTIONER = "hf-blip-cap:/models/blip-image-captioning-base"  # never loaded: only tags and params name it
RETRIEVER = "tiny-clip"
# A captioner's per-epoch training terms (Eq. 8) and a retrieval model's (Eq. 6).
CAPTIONER_LOSSES = ("loss", "l_vsse", "l_sca")
RETRIEVAL_LOSSES = ("loss", "l_cms", "l_vsse", "l_sca")


@dataclass(frozen=True)
class FakeTrial:
    """One trial: its sampled values and its final evaluation metrics (logged at every epoch, scaled by epoch)."""

    trial_id: str
    sampled: dict[str, float]
    final: dict[str, float]
    status: str = "FINISHED"
    ranks: list[QueryRanks] | None = None  # the final evaluation's ranks, uploaded beside a (stand-in) checkpoint


@dataclass(frozen=True)
class FakeSweep:
    sweep_id: str
    options: dict  # TrainConfig options fixed for every trial
    space: dict[str, dict]  # as the sweep file writes it (logged as the parent's "space" param)
    objective: str
    trials: list[FakeTrial] = field(default_factory=list)
    epochs: int = 2


def captioner_metrics(cider: float, bleu4: float, meteor: float | None = None) -> dict[str, float]:
    """What ``trainables.train.evaluate_model`` reports for a captioner: the clean caption keys (METEOR with Java)."""
    metrics = {metric_name(CLEAN, None, key): 20.0 for key in ALWAYS_COMPUTED_CAPTION_KEYS}
    metrics |= {metric_name(CLEAN, None, "cider"): cider, metric_name(CLEAN, None, "bleu4"): bleu4}
    if meteor is not None:
        metrics[metric_name(CLEAN, None, "meteor")] = meteor
    return metrics


def retrieval_metrics(clean_tr1: float, robust_tr1: float, eps: float = 4 / 255) -> dict[str, float]:
    """What ``evaluate_retrieval`` reports, clean and under PGD at ``eps``: every recall key, TR@1 as given."""
    metrics = {metric_name(attack, attack_eps, key): 30.0 for attack, attack_eps in ((CLEAN, None), ("pgd", eps)) for key in RECALL_KEYS}
    metrics |= {metric_name(CLEAN, None, "tr1"): clean_tr1, metric_name("pgd", eps, "tr1"): robust_tr1}
    return metrics


# A captioner sweep (Eq. 8, objective clean/cider): in the eps-2 group the CIDEr-best trial (c2) is
# neither the first nor the last logged and has the lowest BLEU-4, so no other ranking picks it.
CAPTIONER_OPTIONS = {"model": CAPTIONER, "a": 0, "eval_attacks": [], "epochs": 2}
CAPTIONER_SPACE = {"eps": {"distribution": "choice", "values": [2 / 255, 4 / 255]},
                   "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-2}}
CAPTIONER_TRIALS = [
    FakeTrial("c1", {"eps": 2 / 255, "lr": 1e-4}, captioner_metrics(cider=60.0, bleu4=30.0)),
    FakeTrial("c2", {"eps": 2 / 255, "lr": 1e-3}, captioner_metrics(cider=80.0, bleu4=10.0)),
    FakeTrial("c3", {"eps": 2 / 255, "lr": 3e-3}, captioner_metrics(cider=70.0, bleu4=20.0)),
    FakeTrial("c4", {"eps": 4 / 255, "lr": 5e-4}, captioner_metrics(cider=50.0, bleu4=25.0, meteor=22.0)),  # scored with Java
]
# A retrieval sweep (Eq. 6, objective pgd/eps4/tr1): r2 is the robust-best, r1 the clean-best.
RETRIEVAL_OPTIONS = {"model": RETRIEVER, "eps": 4 / 255, "eval_eps": [4 / 255], "epochs": 2}
RETRIEVAL_SPACE = {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}}
RETRIEVAL_TRIALS = [
    FakeTrial("r1", {"a": 0.002}, retrieval_metrics(clean_tr1=50.0, robust_tr1=10.0)),
    FakeTrial("r2", {"a": 0.02}, retrieval_metrics(clean_tr1=40.0, robust_tr1=15.0)),
    FakeTrial("r3", {"a": 0.05}, retrieval_metrics(clean_tr1=45.0, robust_tr1=12.0)),
]


# search.seeds: each defense once per seed on 20 test images (2 captions each). FARE's configuration has
# two seeds; MAVA has a 2-seed configuration (lr 1e-4; robust TR@1 15 and 30, mean 22.5) and a 1-seed one
# (lr 1e-3, 25): ranked by their means the 1-seed one is best, though the other holds the single best seed (s2).
SEED_IMAGES, SEED_CAPTIONS_PER_IMAGE = 20, 2


def seed_trial(trial_id: str, defense: str, seed: int, lr: float, clean_tr1: float, robust_tr1: float) -> FakeTrial:
    """A trial whose uploaded ranks give exactly its TR@1 and IR@1 metrics (IR@1: retrieval_metrics' 30.0)."""
    def query_ranks(attack: str, eps: float | None, tr1: float) -> QueryRanks:
        image_hits = round(tr1 / 100 * SEED_IMAGES)
        caption_hits = round(0.3 * SEED_IMAGES * SEED_CAPTIONS_PER_IMAGE)
        rotate = seed * 3  # seeds hit different images
        images = np.roll(np.r_[np.zeros(image_hits), np.full(SEED_IMAGES - image_hits, 4)], rotate).astype(np.int32)
        captions = np.roll(np.r_[np.zeros(caption_hits), np.full(SEED_IMAGES * SEED_CAPTIONS_PER_IMAGE - caption_hits, 7)], rotate)
        return QueryRanks(attack, eps, images, captions.astype(np.int32), np.repeat(np.arange(SEED_IMAGES), SEED_CAPTIONS_PER_IMAGE))

    ranks = [query_ranks(CLEAN, None, clean_tr1), query_ranks("pgd", 4 / 255, robust_tr1)]
    return FakeTrial(trial_id, {"defense": defense, "seed": seed, "lr": lr}, retrieval_metrics(clean_tr1, robust_tr1), ranks=ranks)


SEEDS_OPTIONS = RETRIEVAL_OPTIONS
SEEDS_SPACE = {"defense": {"distribution": "choice", "values": ["mava", "fare"]}, "lr": {"distribution": "choice", "values": [1e-4, 1e-3]}}
SEEDS_TRIALS = [
    seed_trial("s1", "mava", 0, 1e-4, clean_tr1=50.0, robust_tr1=15.0),
    seed_trial("s2", "mava", 1, 1e-4, clean_tr1=60.0, robust_tr1=30.0),
    seed_trial("s3", "mava", 0, 1e-3, clean_tr1=45.0, robust_tr1=25.0),
    seed_trial("s4", "fare", 0, 1e-4, clean_tr1=40.0, robust_tr1=25.0),
    seed_trial("s5", "fare", 1, 1e-4, clean_tr1=30.0, robust_tr1=15.0),
]


def write_experiments(tracking_uri: str, artifact_location: str) -> None:
    """Experiments ``captions`` (a captioner sweep), ``retrieval`` (a retrieval sweep) and ``mixed`` (one of each)."""
    captions = FakeSweep("cap-1", CAPTIONER_OPTIONS, CAPTIONER_SPACE, "clean/cider", CAPTIONER_TRIALS)
    retrieval = FakeSweep("ret-1", RETRIEVAL_OPTIONS, RETRIEVAL_SPACE, "pgd/eps4/tr1", RETRIEVAL_TRIALS)
    log_sweep(tracking_uri, "captions", artifact_location, captions)
    log_sweep(tracking_uri, "retrieval", artifact_location, retrieval)
    log_sweep(tracking_uri, "seeds", artifact_location, FakeSweep("seeds-1", SEEDS_OPTIONS, SEEDS_SPACE, "pgd/eps4/tr1", SEEDS_TRIALS))
    for sweep in (captions, retrieval):
        log_sweep(tracking_uri, "mixed", artifact_location, FakeSweep(f"mixed-{sweep.sweep_id}", sweep.options, sweep.space,
                                                                      sweep.objective, sweep.trials))


def log_sweep(tracking_uri: str, experiment: str, artifact_location: str, sweep: FakeSweep) -> str:
    """Write ``sweep``'s parent run and one child run per trial; returns the experiment id."""
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment, artifact_location)
    base = TrainConfig(**sweep.options).model_dump(mode="json")
    parent = get_or_create_parent_run(client, experiment_id, sweep.sweep_id, {
        "algorithm": "tpe", "num_trials": len(sweep.trials),
        "objectives": json.dumps([{"metric": sweep.objective, "mode": "max"}]), "space": json.dumps(sweep.space),
    }, tags={"mava.model": base["model"], "mava.defense": base["defense"]})
    tracker = MlflowTrialTracker(tracking_uri, experiment_id, parent, sweep.sweep_id)
    losses = CAPTIONER_LOSSES if base["a"] == 0 else RETRIEVAL_LOSSES
    for fake in sweep.trials:
        trial = SimpleNamespace(trial_id=fake.trial_id, config={"train": base, "sweep": {"searched": list(fake.sampled), "workers_per_trial": 1}, **fake.sampled})
        tracker.on_trial_start(0, [], trial)
        for epoch in range(1, sweep.epochs + 1):
            scale = epoch / sweep.epochs  # the last epoch reports the final values
            result = {"epoch": epoch, **{train_metric(k): 1.0 / epoch for k in losses}, "time/epoch_seconds": 1.0}
            if fake.ranks is not None and epoch == sweep.epochs:
                result[CHECKPOINT_PATH_KEY] = str(stand_in_checkpoint(fake, epoch))
            tracker.on_trial_result(0, [], trial, result | {k: v * scale for k, v in fake.final.items()})
        if fake.status == "FINISHED":
            tracker.on_trial_complete(0, [], trial)
    tracker.flush()  # the tracker writes on its own thread
    return experiment_id


def stand_in_checkpoint(fake: FakeTrial, epoch: int) -> Path:
    """A checkpoint folder as the training loop writes it (state, weights stand-in, the evaluation's ranks)."""
    folder = Path(tempfile.mkdtemp(prefix=f"fake-{fake.trial_id}-"))
    (folder / VISION_FILE).write_bytes(b"not real weights: only hashed for the card")
    (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, "metrics": fake.final}))
    write_ranks(folder / RANKS_FILE, fake.ranks)
    return folder
