"""DDP with two workers on CPU (gloo): the same training as one worker at the same global batch.

``run_training`` runs unchanged in two processes joined by ``torch.distributed`` (gloo on
127.0.0.1), as Ray Train runs it on every worker. One worker is the reference: it takes
the same global batches (rank 0's and rank 1's per-worker batches, as
``DistributedSampler`` splits the data) and the same per-rank attack noise (a function of
seed, epoch and rank), and steps the same optimiser on their mean loss, without DDP. A
tiny random-weight CLIP, 16 synthetic images, 1 epoch.
"""

from __future__ import annotations

import json
import math
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils.data.distributed import DistributedSampler

from trainables.config import TrainConfig
from trainables.data import load_dataset
from trainables.data.items import collate
from trainables.errors import NonFiniteLossError
from trainables.models import load_model
from trainables.names import EPOCH, train_metric
from trainables.steps import STEPS, make_encoders
from trainables.train import build_optimizer, epoch_generator, frozen_features, run_training

WORLD_SIZE = 2
PER_WORKER_BATCH = 4
IMAGES = 16
JOIN_SECONDS = 180  # a hung collective fails the test instead of blocking the suite
CASES = ("plain", "nan")

pytestmark = pytest.mark.slow  # two worker processes (imports alone take ~20 s each on a loaded 2-core machine)


def ddp_config(weights: Path) -> TrainConfig:
    # SGD with a large enough lr that one epoch visibly moves the weights (checked below).
    return TrainConfig(model=f"tiny-clip@{weights}", train_data=f"synthetic:train,n={IMAGES}", eval_data="synthetic:test,n=4",
                       epochs=1, batch_size=PER_WORKER_BATCH, lr=0.05, pgd_steps=1, N=2, M=2, eval_attacks=(), eval_every=0,
                       device="cpu", seed=3)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, config_json: str, port: int, out: str) -> None:
    """One DDP worker. Two trainings in one process group (process start-up and imports cost most of the time):
    ``plain/``, then ``nan/`` where rank 1's loss diverges; each writes what it reported, its weights or its error."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=JOIN_SECONDS))
    config = TrainConfig.model_validate_json(config_json)
    try:
        for case in CASES:
            if case == "nan" and rank == 1:
                _diverge_at_second_batch(config)
            _train_one_case(config, Path(out) / case / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def _train_one_case(config: TrainConfig, folder: Path) -> None:
    folder.mkdir(parents=True)
    reports: list[dict] = []
    try:
        model = load_model(config.model)
        run_training(config, lambda metrics, checkpoint: reports.append({"metrics": metrics, "checkpoint": str(checkpoint) if checkpoint else None}),
                     folder / "checkpoints", model=model)
        save_file({k: v.contiguous() for k, v in model.vision.state_dict().items()}, str(folder / "vision.safetensors"))
        outcome = {"reports": reports}
    except NonFiniteLossError as error:
        outcome = {"reports": reports, "nonfinite": str(error)}
    except Exception:  # written for the test to show; the process then fails
        (folder / "outcome.json").write_text(json.dumps({"crash": traceback.format_exc()}))
        raise
    (folder / "outcome.json").write_text(json.dumps(outcome))


def _diverge_at_second_batch(config: TrainConfig) -> None:
    """This rank's loss (only this rank's) becomes NaN at its second batch, as a diverging step would."""
    import trainables.train

    real, calls = trainables.train.STEPS[config.defense], []

    def diverging(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            terms = {**terms, "loss": terms["loss"] * math.nan}
        return terms

    trainables.train.STEPS = {**trainables.train.STEPS, config.defense: diverging}


@pytest.fixture(scope="module")
def two_workers(random_tiny_clip_weights, tmp_path_factory) -> dict:
    """Both cases trained by two DDP worker processes: ``{"config", "out", case: [rank 0 outcome, rank 1 outcome]}``."""
    config, out = ddp_config(random_tiny_clip_weights), tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_rank_main, args=(config.model_dump_json(), _free_port(), str(out)),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    try:
        while not context.join(timeout=JOIN_SECONDS):
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    found = {case: [json.loads((out / case / f"rank{rank}" / "outcome.json").read_text()) for rank in range(WORLD_SIZE)] for case in CASES}
    return {"config": config, "out": out, **found}


def one_worker_at_the_global_batch(config: TrainConfig) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference: one process, no DDP, each step on both ranks' batches; returns (mean loss terms, weights before, after)."""
    torch.manual_seed(config.seed)
    model = load_model(config.model)
    model.freeze_text()
    before = {k: v.detach().clone() for k, v in model.vision.state_dict().items()}
    train_set = load_dataset(config.train_data, model.image_size)
    cache = frozen_features(model, train_set, config.M, config.batch_size, torch.device("cpu"))
    optimizer = build_optimizer(config, model.vision.parameters())
    attack_encode, train_encode = make_encoders(model.vision, model.vision, model.normalize, config)
    epoch = 1
    shards = []
    for rank in range(WORLD_SIZE):
        sampler = DistributedSampler(train_set, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    generators = [epoch_generator(config.seed, epoch, rank, torch.device("cpu")) for rank in range(WORLD_SIZE)]
    totals: dict[str, float] = {}
    seen = 0
    for start in range(0, len(shards[0]), config.batch_size):
        parts = [collate([train_set[i] for i in shard[start:start + config.batch_size]]) for shard in shards]
        global_batch = sum(len(part.item_ids) for part in parts)
        optimizer.zero_grad(set_to_none=True)
        model.vision.train()
        for part, generator in zip(parts, generators):
            captions = torch.stack([cache[i][0] for i in part.item_ids])
            originals = torch.stack([cache[i][1] for i in part.item_ids])
            terms = STEPS[config.defense](attack_encode, train_encode, part.images, captions, originals, config, generator)
            # The mean over the global batch, accumulated part by part (every loss term is a per-image mean).
            (terms["loss"] * len(part.item_ids) / global_batch).backward()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(part.item_ids)
            seen += len(part.item_ids)
        optimizer.step()
    after = {k: v.detach().clone() for k, v in model.vision.state_dict().items()}
    return {train_metric(k): v / seen for k, v in totals.items()}, before, after


def test_two_ddp_workers_train_as_one_worker_at_the_same_global_batch(two_workers):
    config, ranks, out = two_workers["config"], two_workers["plain"], two_workers["out"] / "plain"
    for outcome in ranks:
        assert "crash" not in outcome and "nonfinite" not in outcome, outcome
    expected_terms, before, after = one_worker_at_the_global_batch(config)

    # Only rank 0 writes a checkpoint; every rank reports each epoch once (Ray Train needs every rank's report)
    # and only rank 0's metrics reach Tune, so rank 0 alone carries the evaluation.
    [zero], [one] = ranks[0]["reports"], ranks[1]["reports"]
    assert zero["metrics"][EPOCH] == one["metrics"][EPOCH] == 1
    assert zero["checkpoint"] and Path(zero["checkpoint"]).is_dir() and one["checkpoint"] is None
    assert not list((out / "rank1" / "checkpoints").glob("*"))
    assert "clean/tr1" in zero["metrics"] and not any(k.startswith("clean/") for k in one["metrics"])

    # The same loss terms per epoch (averaged over all 16 images), on both ranks.
    gradnorms = {train_metric(k) for k in ("gradnorm_cms", "gradnorm_vsse", "gradnorm_sca")}
    assert set(expected_terms) == {k for k in zero["metrics"] if k.startswith("train/")} - gradnorms == {train_metric(k) for k in ("loss", "l_cms", "l_vsse", "l_sca")}
    # Each term's gradient norm (rank-local gradients of the first batch, averaged over the ranks): the same on both.
    # (L_SCA's may be ~0 here: on epoch 1's first batch the encoder still equals F_org.)
    assert all(zero["metrics"][k] == one["metrics"][k] for k in gradnorms)
    assert zero["metrics"][train_metric("gradnorm_cms")] > 0 and zero["metrics"][train_metric("gradnorm_vsse")] > 0
    for key, value in expected_terms.items():
        assert zero["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert one["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # The same weights after the epoch, on both ranks; and the epoch moved them far beyond that tolerance.
    tolerance = 1e-5
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 100 * tolerance
    for rank in range(WORLD_SIZE):
        weights = load_file(str(out / f"rank{rank}" / "vision.safetensors"))
        worst = max((weights[k] - after[k]).abs().max().item() for k in after)
        assert worst < tolerance, (rank, worst)
    saved = load_file(str(Path(zero["checkpoint"]) / "vision.safetensors"))
    assert max((saved[k] - after[k]).abs().max().item() for k in after) < tolerance


def test_a_nan_on_one_rank_stops_every_rank_with_one_reason(two_workers):
    ranks = two_workers["nan"]
    reasons = [outcome.get("nonfinite") for outcome in ranks]
    assert reasons[0] and reasons[0] == reasons[1], ranks
    assert "the mava loss became nan at epoch 1, batch 1 on rank 1 of 2 (loss=nan" in reasons[0]
    assert "lower lr (now 0.05)" in reasons[0]
    # Stopped inside the first epoch: nothing reported, no checkpoint written.
    assert ranks[0]["reports"] == ranks[1]["reports"] == []
    assert not list((two_workers["out"] / "nan").rglob("vision.safetensors"))


def _with_and_without_a_group(_index: int, config_json: str, port: int, out: str) -> None:
    """One process: train without a process group (in-process, or a one-worker trial), then in a group of one (as
    ``TorchTrainer`` ran one worker with DDP); each writes its weights."""
    torch.set_num_threads(1)
    config = TrainConfig.model_validate_json(config_json)
    _train_one_case(config, Path(out) / "no-group")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=JOIN_SECONDS))
    try:
        _train_one_case(config, Path(out) / "group-of-one")
    finally:
        dist.destroy_process_group()


def test_one_worker_trains_the_same_weights_with_or_without_a_process_group(random_tiny_clip_weights, tmp_path):
    """A one-worker sweep trial runs without a process group (``trainables.ray_worker._trainer_class``); it trains
    bit for bit what it trained as a DDP group of one (same data order, same attack noise), and what
    ``platform.finetune`` trains in-process."""
    config = ddp_config(random_tiny_clip_weights)
    mp.start_processes(_with_and_without_a_group, args=(config.model_dump_json(), _free_port(), str(tmp_path)),
                       nprocs=1, join=True, start_method="spawn")
    weights = {case: load_file(str(tmp_path / case / "vision.safetensors")) for case in ("no-group", "group-of-one")}
    start = load_model(config.model).vision.state_dict()
    assert any(not torch.equal(start[k], weights["no-group"][k]) for k in start)  # the epoch moved the weights
    assert weights["no-group"].keys() == weights["group-of-one"].keys()
    assert all(torch.equal(weights["no-group"][k], weights["group-of-one"][k]) for k in weights["no-group"])
