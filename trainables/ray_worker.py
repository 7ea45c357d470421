"""The one adapter between the training loop and Ray: the Tune trial and the Train worker loop.

Both run on Ray workers, where ``platform`` is the standard library's module, so
they live here, in ``trainables``, and are the only code of it that imports Ray.

``run_trial`` is the Tune trial, the pattern Ray 2.4x+ documents for Train under
Tune (Train V2): a plain function that builds a Ray Train trainer and fits it
(``TorchTrainer`` for several workers; for one, no torch process group: see
``_trainer_class``); results flow back to Tune through ``TuneReportCallback``. The Train run's name is
the sweep id plus the Tune trial id, never a timestamp, so a retried or resumed
trial finds its own checkpoints in ``storage_path`` and continues from the last
epoch.

``train_loop_per_worker`` runs on every Ray Train worker. It rebuilds the typed config from the plain dict
Ray passes, resumes from Ray's latest checkpoint when the run is being retried
or resumed, and forwards each epoch's metrics and checkpoint to ``ray.train.report``.
A resumed worker first reports its checkpoint's epoch again (``REPLAYED_KEY`` = 1):
if the driver died after Ray persisted that checkpoint but before the epoch reached
MLflow, the epoch is recorded now instead of leaving a gap; the tracker ignores an
epoch it already holds. Every result also says which epoch the worker started from
(``RESUMED_FROM_KEY``, 0 for a fresh start) and the Ray node each rank runs on
(``WORKER_NODES_KEY``, node ids by rank, gathered once per worker-group start), so a
trial's placement and any restart on other nodes are visible in Tune's results.
A NaN/inf loss is deterministic, so instead of failing (and being retried by
Ray's failure handling) the worker reports it under ``NONFINITE_KEY`` and stops;
the trial function turns that into a failed trial with the reason (which the
MLflow tracker records as the ``mava.failure`` tag of the FAILED child run).
A finished trial leaves its final result beside its checkpoints (``DONE_FILE``): if
the sweep driver dies before Tune has saved that the trial ended, the resumed sweep
reports that result again instead of training it twice.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.errors import NonFiniteLossError
from trainables.names import (BASE_WEIGHTS_SHA256, PINNED_MODELS_KEY, PINNED_SPECS_KEY, CHECKPOINT_PATH_KEY, DONE_FILE, EPOCH, NONFINITE_FILE,
                              NONFINITE_KEY, final_metric)
# Bookkeeping keys (no '/', so the MLflow tracker never logs them as metrics).
RESUMED_FROM_KEY = "resumed_from_epoch"
REPLAYED_KEY = "replayed"
WORKER_NODES_KEY = "worker_nodes"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"train": TrainConfig fields, "objectives": metric names, "base_weights_sha256": hex}``.

    The model spec in ``train`` is the one the sweep's edge pinned (``trainables.models.embedded``): a worker
    checks that the weights it is about to load hash to the sweep's ``base_weights_sha256`` and never pretrains.
    """
    # Imported here, not at the top: Tune's trial actor and Ray Train's controller also import this
    # module (to unpickle ``run_trial`` and this function) in fresh processes, and neither trains.
    # Only the Train workers pay for open_clip, transformers and the model code (~3 s per process
    # on 2 idle cores; two processes fewer per trial, see BENCHMARKS.md).
    from trainables.checkpoint import read_checkpoint_state
    from trainables.config import TrainConfig
    from trainables.models.embedded import verify_base_weights
    from trainables.train import run_training

    train_config = TrainConfig(**config["train"])
    if config.get(BASE_WEIGHTS_SHA256):
        verify_base_weights(train_config.model, config[BASE_WEIGHTS_SHA256])
    objectives = config["objectives"]
    scratch = Path(tempfile.mkdtemp(prefix="mava-ckpt-"))
    resumed_from = 0
    nodes = ",".join(_worker_nodes())

    def report(metrics: dict[str, float], checkpoint_dir: Path | None, replayed_from: str | None = None) -> None:
        # Objectives are reported under their own keys, NaN until the last epoch: a trial that a
        # scheduler stops early then reaches Optuna as failed, never as complete with partial values.
        last = metrics[EPOCH] == train_config.epochs
        metrics = {**metrics, **{final_metric(m): (metrics.get(m, math.nan) if last else math.nan) for m in objectives},
                   RESUMED_FROM_KEY: resumed_from, REPLAYED_KEY: int(replayed_from is not None), WORKER_NODES_KEY: nodes}
        if replayed_from is not None:  # where the replayed epoch's weights are, as TuneReportCallback says for new ones
            metrics[CHECKPOINT_PATH_KEY] = replayed_from
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir:  # Ray has persisted it to the run's storage; the local copy is no longer needed
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def report_nonfinite(reason: str) -> None:
        # With a (marker) checkpoint: Ray Train's Result keeps only metrics that come with one.
        marker = scratch / "nonfinite"
        marker.mkdir(parents=True, exist_ok=True)
        (marker / NONFINITE_FILE).write_text(json.dumps({"reason": reason}))
        ray.train.report({NONFINITE_KEY: reason}, checkpoint=ray.train.Checkpoint.from_directory(str(marker)))

    try:
        latest = ray.train.get_checkpoint()
        if latest is None:
            run_training(train_config, report, scratch)
        else:
            with latest.as_directory() as resume_dir:
                if (Path(resume_dir) / NONFINITE_FILE).is_file():  # stopped by a NaN loss before an interruption: say so again
                    report_nonfinite(json.loads((Path(resume_dir) / NONFINITE_FILE).read_text())["reason"])
                    return
                state = read_checkpoint_state(Path(resume_dir))
                resumed_from = int(state[EPOCH])
                report(state["metrics"], None, replayed_from=latest.path)
                run_training(train_config, report, scratch, resume_from=Path(resume_dir))
    except NonFiniteLossError as error:
        report_nonfinite(str(error))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective: every rank of the worker group calls it once)."""
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return [mine]
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return [str(node) for node in nodes]


class TrialFailed(RuntimeError):
    """The trial's training stopped for a reason recorded in its message (e.g. a NaN loss)."""


def training_options(config: dict) -> dict:
    """The trial's full TrainConfig fields: the sweep's fixed options plus this trial's sampled values.

    Sampled keys sit at the top level of the Tune config (so Optuna sees plain names
    such as ``a`` and ``lr``); fixed options sit under ``"train"``.
    """
    return {**config["train"], **{key: config[key] for key in config["sweep"]["searched"]}}


def pinned_model(config: dict) -> dict[str, str] | None:
    """The trial's model as the sweep's edge pinned it, ``{"name": ..., "spec": ..., "sha256": ...}``, found by the spelling
    the trial has (the fixed ``model``, or the value it drew when ``model`` is searched); None when the sweep pinned
    none (a trial config written without ``platform.sweep``'s edge: its model spec is used as written)."""
    name = training_options(config).get("model")
    return next((entry for entry in config["sweep"].get(PINNED_MODELS_KEY, ()) if entry["name"] == name), None)


def pinned_sha256(config: dict) -> str | None:
    """The sha256 of the trial's pinned base weights (what its workers verify and its run records), or None."""
    return (pinned_model(config) or {}).get("sha256")


def worker_options(config: dict) -> dict:
    """What the Train workers run: :func:`training_options` with the specs the sweep's edge parsed and pinned.

    The trial's recorded options keep the specs as the user wrote them (``tiny-clip``); the workers get
    canonical strings with absolute paths (``sweep.pinned_specs``), the model pinned to its weights file
    (``tiny-clip@<storage>/base-weights/tiny-clip-sha256-<hex>.safetensors``, from ``sweep.pinned_models``).
    """
    pinned = pinned_model(config)
    return {**training_options(config), **config["sweep"].get(PINNED_SPECS_KEY, {}), **({"model": pinned["spec"]} if pinned else {})}


def run_trial(config: dict) -> None:
    """Tune function trainable. ``config = {"train": fixed options, "sweep": run settings, <searched keys>}``."""
    sweep = config["sweep"]
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{sweep['sweep_id']}-train-{trial_id}"
    done = _done_file(sweep, trial_id)
    previous = _read_json(done)
    if previous is not None:
        # This trial finished before the sweep was interrupted, after Tune last saved its state:
        # report its result again (Tune, Optuna and MLflow complete it) instead of restarting workers.
        ray.tune.report({**previous, REPLAYED_KEY: 1})
        return
    trainer = _trainer_class(sweep["workers_per_trial"])(
        train_loop_per_worker,
        train_loop_config={"train": worker_options(config), "objectives": sweep["objectives"],
                           BASE_WEIGHTS_SHA256: pinned_sha256(config)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sweep["workers_per_trial"],
            use_gpu=sweep["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": sweep["cpus_per_worker"], **({"GPU": sweep["gpus_per_worker"]} if sweep["gpus_per_worker"] > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=sweep["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=sweep["max_failures"]),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.metrics and NONFINITE_KEY in result.metrics:
        raise TrialFailed(result.metrics[NONFINITE_KEY])
    final = dict(result.metrics or {})
    if result.checkpoint is not None:
        final[CHECKPOINT_PATH_KEY] = result.checkpoint.path
    _write_json(done, final)


def _trainer_class(workers: int) -> type:
    """Ray Train's trainer for a trial of ``workers`` workers: ``TorchTrainer`` (a torch process group, DDP) for several;
    for one, its base ``DataParallelTrainer`` with no backend: one rank has no peer to synchronise with, and without
    the torch backend neither Tune's trial actor nor Ray Train's controller imports torch (seconds per trial; see
    BENCHMARKS.md, "Sweep overhead")."""
    if workers == 1:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return DataParallelTrainer
    from ray.train.torch import TorchTrainer

    return TorchTrainer


def _done_file(sweep: dict, trial_id: str) -> str:
    return f"{sweep['storage_path'].rstrip('/')}/{sweep['sweep_id']}-train-{trial_id}/{DONE_FILE}"


def finished_result(config: dict, trial_id: str) -> dict | None:
    """The final result a finished trial left beside its checkpoints (with its checkpoint's path), or None."""
    return _read_json(_done_file(config["sweep"], trial_id))


def _read_json(uri: str) -> dict | None:
    """A small JSON file on the run's storage (a local path or a pyarrow-supported URI such as s3://), or None."""
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def _write_json(uri: str, values: dict) -> None:
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(values, default=str).encode())
