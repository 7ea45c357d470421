"""The training loop: adversarial fine-tuning of the vision encoder, one function for every setting.

``run_training`` is ordinary PyTorch. It runs in-process (tests, ``platform.finetune``)
and, unchanged, on every Ray Train worker (``trainables.ray_worker``); in a trial of several
workers ``torch.distributed`` is initialised and the vision encoder is wrapped in DDP.
Per epoch, in order: train (attack -> forward -> loss -> step), evaluate, checkpoint,
report. On each epoch's first batch the loop also measures the gradient norm each
weighted loss term alone gives the vision encoder (``train/gradnorm_*``,
``trainables.steps.term_gradient_norms``), so a run shows which term drives its update. The text side and ``F_org`` are frozen, so their features are computed once
per dataset before the first epoch.

A captioner (``model.has_text_encoder`` False, e.g. ``hf-blip-cap``) has no caption
features: MAVA trains it with the paper's Eq. 8 (``b*L_VSSE + c*L_SCA``), FARE as
usual, and each evaluation scores its clean captions instead of retrieval recall.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from trainables.checkpoint import load_training_checkpoint, save_training_checkpoint
from trainables.config import Defense, OptimizerName, Precision, TrainConfig, captioner_problems
from trainables.data import check_min_captions, load_dataset
from trainables.data.items import collate
from trainables.device import resolve_device
from trainables.errors import NonFiniteLossError, UserError
from trainables.evaluation.examples import EXAMPLES_DIR, write_trial_examples
from trainables.models import load_model
from trainables.models.base import VLPModel
from trainables.names import EPOCH, EPOCH_SECONDS, RANKS_FILE, SETUP_SECONDS, TRAIN_SECONDS, train_metric
from trainables.seeds import TRAIN_ATTACK, derive_seed
from trainables.steps import STEPS, make_encoders, step_precision, tecoa_step, term_gradient_norms
from trainables.tasks import EpochEval, Task, task_info

# Called once per epoch with the epoch's metrics and its checkpoint directory (None on ranks > 0).
Reporter = Callable[[dict[str, float], Path | None], None]


def check_speed_options(config: TrainConfig, device: torch.device) -> None:
    """Refuse the speed options where they do not help: they are GPU options (BENCHMARKS.md has the numbers).

    On the 2-core CPU of BENCHMARKS.md, bf16 autocast made the MAVA step slower (the
    tiny encoder's matmuls are too small to gain from bf16, the casts cost), compile
    spent minutes compiling for a small gain that a sweep trial's few dozen steps never
    pay back, and channels_last changes nothing (a ViT's only convolution is its patch
    embedding). A run that asks for them on a CPU gets this message instead of a silently
    different configuration.
    """
    if device.type == "cuda":
        if config.precision is Precision.BF16 and not torch.cuda.is_bf16_supported():
            raise UserError(f"precision: bf16 needs a GPU with bf16 support ({torch.cuda.get_device_name(device)} has none); "
                            "set precision: fp32")
        return
    asked = [text for text, on in (("precision: bf16", config.precision is Precision.BF16), ("compile: true", config.compile),
                                   ("channels_last: true", config.channels_last)) if on]
    if asked:
        raise UserError(f"{', '.join(asked)}: speed option(s) for CUDA GPUs, but this run resolved device {config.device!r} "
                        f"to {device.type}, where they did not make the step faster (BENCHMARKS.md); "
                        "use precision: fp32, compile: false, channels_last: false")


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Attack noise for one epoch on one rank: a function of (seed, epoch, rank) only, so resume is exact."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, TRAIN_ATTACK, epoch, rank))


def check_model_fits(config: TrainConfig, model: VLPModel) -> None:
    """Refuse options the loaded model cannot honour (a captioner: TeCoA, a != 0, ...), naming each fix.

    TrainConfig already refuses them when ``config.model`` names a captioner; this checks
    the model actually loaded (or passed in), whose ``has_text_encoder`` is the truth.
    """
    problems = [] if model.has_text_encoder else captioner_problems(config)
    if problems:
        raise UserError(f"{model.spec} is a captioning model (no text encoder): " + "; ".join(problems))


@torch.no_grad()
def frozen_features(model: VLPModel, dataset: Dataset, captions_per_image: int, batch_size: int,
                    device: torch.device) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """item id -> (caption features (M, D) of its first M captions, F_org(image) (D,)), computed once.

    A captioner has no text encoder: its caption features are None (MAVA's Eq. 8 needs only F_org).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    features = {}
    for batch in loader:
        text = None
        if model.has_text_encoder:
            captions = [caption for group in batch.captions for caption in group[:captions_per_image]]
            text = model.encode_text(captions).view(len(batch.captions), captions_per_image, -1)
        original = model.encode_image_original(batch.images.to(device))
        for index, item_id in enumerate(batch.item_ids):
            features[item_id] = (None if text is None else text[index], original[index])
    return features


def evaluate_model(model: VLPModel, dataset: Dataset, config: TrainConfig, progress: bool = False,
                   ranks_file: Path | None = None) -> dict[str, float]:
    """The evaluation after an epoch: the evaluator of the run's task (``config.run_task``, ``trainables.tasks``).

    Retrieval: recall (``clean/tr1``, ``pgd/eps4/ir1``, ...) clean and under ``eval_attacks``. Captioning:
    clean caption metrics (``clean/bleu4``, ``clean/cider``, ...; x100, BLIP's decoding); its robust numbers
    need attacks crafted on a retrieval surrogate (``python -m platform.evaluate_captions``, Table 8).
    A metric that cannot run offline (SPICE; METEOR without Java) is absent, not NaN. ``ranks_file``: retrieval
    also writes every test query's rank there (what ``platform.compare`` bootstraps over test images).
    """
    settings = EpochEval(attacks=config.eval_attacks, eps=config.eval_eps, batch_size=max(config.batch_size, 64), seed=config.seed,
                         k_test=config.k_test, word_candidates=config.word_candidates, ranks_file=ranks_file)
    return task_info(config.run_task).evaluate(model, dataset, settings, progress)


def build_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def run_training(config: TrainConfig, report: Reporter, checkpoint_root: Path, resume_from: Path | None = None,
                 progress: bool = False, model: VLPModel | None = None) -> dict[str, float]:
    """Fine-tune ``config.model``'s vision encoder with ``config.defense``; returns the last epoch's metrics.

    Args:
        report: called after every epoch with the metrics and the checkpoint directory.
        checkpoint_root: epoch checkpoints are written to ``checkpoint_root/epoch-NNNN`` (rank 0).
        resume_from: a checkpoint directory to continue from (its epoch is skipped).
        model: an already-loaded model (tests); by default ``config.model`` is loaded.
    """
    setup_started = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = resolve_device(config.device)
    check_speed_options(config, device)
    torch.manual_seed(config.seed)
    model = (model if model is not None else load_model(config.model)).to(device)
    model.freeze_text()
    check_model_fits(config, model)
    train_set = load_dataset(config.train_data, model.image_size)
    if model.has_text_encoder:  # a captioner's training reads no captions
        check_min_captions(train_set, config.M)
    eval_set = load_dataset(config.eval_data, model.image_size) if rank == 0 else None
    cache = frozen_features(model, train_set, config.M, config.batch_size, device)

    optimizer = build_optimizer(config, model.vision.parameters())
    start_epoch = load_training_checkpoint(resume_from, model.vision, optimizer) if resume_from else 0
    if config.channels_last:
        model.vision.to(memory_format=torch.channels_last)  # in place: the optimiser keeps the same parameters
    train_vision = DistributedDataParallel(model.vision) if distributed else model.vision
    step = STEPS[config.defense]
    if config.defense is Defense.TECOA:
        step = functools.partial(tecoa_step, logit_scale=model.logit_scale)
    # The attack differentiates w.r.t. its input only; the outer forward goes through DDP (gradient sync).
    attack_encode, train_encode = make_encoders(model.vision, train_vision, model.normalize, config)
    # Model and data loading, F_org and caption features: reported once per (re)start, with the first epoch.
    setup_seconds: float | None = time.perf_counter() - setup_started

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        epoch_started = time.perf_counter()
        # One data order wherever the loop runs (in-process, a one-worker trial without a process group, or rank r
        # of a DDP trial): DistributedSampler's, seeded by the run's seed and the epoch (one replica: every image).
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate, drop_last=False)
        generator = epoch_generator(config.seed, epoch, rank, device)
        totals: dict[str, float] = {}
        gradient_norms: dict[str, float] = {}
        seen = 0
        for batch_index, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress or rank != 0, unit="batch")):
            images = batch.images.to(device)
            caption_features = torch.stack([cache[item_id][0] for item_id in batch.item_ids]) if model.has_text_encoder else None
            original_features = torch.stack([cache[item_id][1] for item_id in batch.item_ids])
            model.vision.train()
            with step_precision(config, device):
                terms = step(attack_encode, train_encode, images, caption_features, original_features, config, generator)
            loss = terms["loss"]
            if not _finite_on_every_rank(loss, distributed):
                raise NonFiniteLossError(_nonfinite_reason(terms, config, epoch, batch_index, distributed))
            if batch_index == 0:  # each term's share of the update (train/gradnorm_*), on one batch: cheap
                gradient_norms = term_gradient_norms(terms, config, list(model.vision.parameters()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(images)
            seen += len(images)
        train_seconds = time.perf_counter() - epoch_started
        metrics = {EPOCH: epoch, **_average_across_ranks(totals, seen, distributed),
                   **_average_across_ranks(gradient_norms, 1, distributed), TRAIN_SECONDS: train_seconds}
        epoch_dir = checkpoint_root / f"epoch-{epoch:04d}"
        if rank == 0 and _evaluates(config, epoch):
            epoch_dir.mkdir(parents=True, exist_ok=True)  # the ranks file sits beside the checkpoint written below
            metrics.update(evaluate_model(model, eval_set, config, progress=progress, ranks_file=epoch_dir / RANKS_FILE))
        metrics[EPOCH_SECONDS] = time.perf_counter() - epoch_started
        if setup_seconds is not None:
            metrics[SETUP_SECONDS], setup_seconds = setup_seconds, None
        checkpoint = None
        if rank == 0:
            checkpoint = save_training_checkpoint(epoch_dir, model.vision, optimizer, epoch,
                                                  config.model_dump(mode="json"), metrics)
            if epoch == config.epochs and _draws_examples(config, model):
                write_trial_examples(model, eval_set, config, checkpoint / EXAMPLES_DIR)
        report(metrics, checkpoint)
    return metrics


def _finite_on_every_rank(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on every DDP rank.

    Agreed across ranks before anyone raises: a rank that stopped alone would leave the
    others waiting forever in the next gradient all-reduce.
    """
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


def _nonfinite_reason(terms: dict[str, torch.Tensor], config: TrainConfig, epoch: int, batch_index: int, distributed: bool) -> str:
    """Why training stops, the same text on every rank: the terms of the first rank whose loss is not finite.

    Every rank raises (they agreed in ``_finite_on_every_rank``); a rank whose own loss was
    finite must not report its finite value as the reason, so the ranks' terms are gathered.
    """
    values, where = {key: value.item() for key, value in terms.items()}, ""
    if distributed:
        gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        rank = next(r for r, terms_of_rank in enumerate(gathered) if not math.isfinite(terms_of_rank["loss"]))
        values, where = gathered[rank], f" on rank {rank} of {len(gathered)}"
    text = ", ".join(f"{key}={value:.4g}" for key, value in values.items())
    return (f"the {config.defense.value} loss became {values['loss']} at epoch {epoch}, batch {batch_index}{where} ({text}): "
            f"lower lr (now {config.lr:g}) or eps (now {config.eps:.4g}), or check the data")


def _draws_examples(config: TrainConfig, model: VLPModel) -> bool:
    """Adversarial-example pictures need a retrieval model (captions to retrieve) and an attack to show."""
    return config.examples > 0 and bool(config.eval_attacks) and config.run_task is Task.RETRIEVAL


def _evaluates(config: TrainConfig, epoch: int) -> bool:
    if epoch == config.epochs:
        return True
    return config.eval_every > 0 and epoch % config.eval_every == 0


def _average_across_ranks(totals: dict[str, float], seen: int, distributed: bool) -> dict[str, float]:
    keys = sorted(totals)
    values = torch.tensor([totals[k] for k in keys] + [float(seen)], dtype=torch.float64)
    if distributed:
        dist.all_reduce(values)
    count = values[-1].item()
    return {train_metric(k): (values[i].item() / count if count else math.nan) for i, k in enumerate(keys)}
