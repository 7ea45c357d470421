"""The one adapter between the training loop and Ray: the Tune trial and the Train worker loop.

Both run on Ray workers, where ``platform`` is the standard library's module, so
they live here, in ``trainables``, and are the only code of it that imports Ray.

``run_trial`` is the Tune trial, the pattern Ray 2.4x+ documents for Train under
Tune (Train V2): a plain function that builds a ``TorchTrainer`` and fits it;
results flow back to Tune through ``TuneReportCallback``. The Train run's name is
the sweep id plus the Tune trial id, never a timestamp, so a retried or resumed
trial finds its own checkpoints in ``storage_path`` and continues from the last
epoch.

``train_loop_per_worker`` runs on every Ray Train worker. It rebuilds the typed config from the plain dict
Ray passes, resumes from Ray's latest checkpoint when the run is being retried
or resumed, and forwards each epoch's metrics and checkpoint to ``ray.train.report``.
A NaN/inf loss is deterministic, so instead of failing (and being retried by
Ray's failure handling) the worker reports it under ``NONFINITE_KEY`` and stops;
the trial function turns that into a failed trial with the reason.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.config import TrainConfig
from trainables.errors import NonFiniteLossError
from trainables.train import run_training

NONFINITE_KEY = "error/nonfinite_loss"
FINAL_PREFIX = "final/"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"train": TrainConfig fields, "objectives": metric names}``."""
    train_config = TrainConfig(**config["train"])
    objectives = config["objectives"]
    scratch = Path(tempfile.mkdtemp(prefix="mava-ckpt-"))

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # Objectives are reported under their own keys, NaN until the last epoch: a trial that a
        # scheduler stops early then reaches Optuna as failed, never as complete with partial values.
        last = metrics["epoch"] == train_config.epochs
        metrics = {**metrics, **{FINAL_PREFIX + m: (metrics.get(m, math.nan) if last else math.nan) for m in objectives}}
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir:  # Ray has persisted it to the run's storage; the local copy is no longer needed
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    try:
        latest = ray.train.get_checkpoint()
        if latest is None:
            run_training(train_config, report, scratch)
        else:
            with latest.as_directory() as resume_dir:
                run_training(train_config, report, scratch, resume_from=Path(resume_dir))
    except NonFiniteLossError as error:
        ray.train.report({NONFINITE_KEY: str(error)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class TrialFailed(RuntimeError):
    """The trial's training stopped for a reason recorded in its message (e.g. a NaN loss)."""


def training_options(config: dict) -> dict:
    """The trial's full TrainConfig fields: the sweep's fixed options plus this trial's sampled values.

    Sampled keys sit at the top level of the Tune config (so Optuna sees plain names
    such as ``a`` and ``lr``); fixed options sit under ``"train"``.
    """
    return {**config["train"], **{key: config[key] for key in config["sweep"]["searched"]}}


def run_trial(config: dict) -> None:
    """Tune function trainable. ``config = {"train": fixed options, "sweep": run settings, <searched keys>}``."""
    sweep = config["sweep"]
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": training_options(config), "objectives": sweep["objectives"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sweep["workers_per_trial"],
            use_gpu=sweep["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": sweep["cpus_per_worker"], **({"GPU": sweep["gpus_per_worker"]} if sweep["gpus_per_worker"] > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"{sweep['sweep_id']}-train-{trial_id}",
            storage_path=sweep["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=sweep["max_failures"]),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.metrics and NONFINITE_KEY in result.metrics:
        raise TrialFailed(result.metrics[NONFINITE_KEY])
