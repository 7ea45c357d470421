"""Bad input, one case per mistake: a message naming the problem and the fix, exit code 2, no traceback,
and nothing already recorded (MLflow runs, checkpoints, shards) touched.

Every case runs a command's real ``main()`` under the same ``run_cli`` wrapper ``python -m``
uses, in this process (each subprocess would cost ~5 s of imports); a handful run as real
subprocesses to prove what a user sees on the terminal. Before the cases, a store is
built with an MLflow run, its artifact, a training checkpoint and a Parquet shard; its
snapshot (runs with their params, metrics, tags and status; every file's sha256) must be
the same after every case. A case that got past validation would start work: the test
replaces the first step of real work (Ray, evaluation) with a failure so it shows at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

import platform.data
import platform.evaluate
import platform.finetune
import platform.sweep
from conftest import REPO_ROOT
from platform.cli import EXIT_USER_ERROR, run_cli
from trainables.data.parquet import write_parquet_shards
from trainables.data.annotations import read_captions_json
from trainables.models.tiny_clip import build_tiny_clip
from trainables.models.weights import file_sha256

COMMANDS = {"sweep": platform.sweep.main, "evaluate": platform.evaluate.main, "finetune": platform.finetune.main,
            "data": platform.data.main}
# A message must say what to do, not only what is wrong (argparse's own usage errors excepted).
FIX_WORDS = ("use ", "give", "pass", "check", "choose", "write", "lower", "remove", "set ", "fix", "start", "re-convert",
             "copy", "restore", "quote", "run ", "point", "convert", "save", "drop", "needs", "valid kinds", "allowed options",
             "re-export", "must look like")


class Evil:
    """A pickle that runs code when unpickled: it creates the file named by ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _png(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 24), colour).save(path)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_tiny_clip_weights) -> dict:
    """Every file the cases point at, and a store of existing results that no case may touch."""
    root = tmp_path_factory.mktemp("bad-input")
    w: dict = {"root": root}

    # -- the store of existing results: an MLflow run with an artifact, a checkpoint, a shard --
    store = root / "store"
    (store / "ray").mkdir(parents=True)
    w["store"], w["uri"] = store, f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(w["uri"])
    experiment = client.create_experiment("existing", artifact_location=(store / "mlartifacts").as_uri())
    run = client.create_run(experiment, run_name="existing-run", tags={"mava.role": "trial"})
    client.log_param(run.info.run_id, "lr", "0.0001")
    client.log_metric(run.info.run_id, "pgd/eps4/tr1", 12.5, step=1)
    checkpoint = store / "finetune-out" / "checkpoints" / "epoch-0001"
    checkpoint.mkdir(parents=True)
    vision = build_tiny_clip().visual.state_dict()
    save_file({k: v.contiguous() for k, v in vision.items()}, str(checkpoint / "vision.safetensors"))
    (checkpoint / "card.json").write_text(json.dumps({"sha256": file_sha256(checkpoint / "vision.safetensors"),
                                                      "weights_file": "vision.safetensors"}))
    client.log_artifacts(run.info.run_id, str(checkpoint), "checkpoint")
    client.set_terminated(run.info.run_id)
    w["checkpoint"] = checkpoint

    # -- data: images, annotation files, Parquet folders --
    images = root / "images"
    for name in ("a.png", "b.png"):
        _png(images / name)
    (images / "corrupt.png").write_bytes(b"this is not a PNG")
    two_captions = [{"image": "a.png", "caption": ["a red square", "a red box"]}, {"image": "b.png", "caption": ["a red thing", "red"]}]
    w["images"] = images
    w["good_json"] = root / "good.json"
    w["good_json"].write_text(json.dumps(two_captions))
    w["corrupt_json"] = root / "corrupt-image.json"
    w["corrupt_json"].write_text(json.dumps(two_captions + [{"image": "corrupt.png", "caption": ["broken", "image"]}]))
    w["missing_image_json"] = root / "missing-image.json"
    w["missing_image_json"].write_text(json.dumps(two_captions + [{"image": "gone.png", "caption": ["x", "y"]}]))
    w["empty_json"] = root / "empty.json"
    w["empty_json"].write_text("[]")
    w["invalid_json"] = root / "invalid.json"
    w["invalid_json"].write_text('[{"image": "a.png", "caption": ["x"]},')
    w["binary_json"] = root / "binary.json"
    w["binary_json"].write_bytes(b"\xff\xfe\x00\x81binary")
    w["karpathy"] = root / "dataset_coco.json"
    w["karpathy"].write_text(json.dumps({"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": "a red square"}]}]}))
    w["no_captions_json"] = root / "no-captions.json"
    w["no_captions_json"].write_text(json.dumps([{"image": "a.png", "caption": []}]))
    w["shards"] = store / "shards"
    write_parquet_shards(read_captions_json(w["good_json"], images), w["shards"], progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq
    w["bad_schema"] = root / "bad-schema"
    w["bad_schema"].mkdir()
    pq.write_table(pa.table({"img": [b"x"], "text": ["a caption"]}), w["bad_schema"] / "part-00000.parquet")
    w["corrupt_shards"] = root / "corrupt-shards"
    w["corrupt_shards"].mkdir()
    (w["corrupt_shards"] / "part-00000.parquet").write_bytes(b"PAR1 but not really parquet")
    w["no_shards"] = root / "no-shards"
    w["no_shards"].mkdir()

    # -- weights: random (good), corrupt, another architecture, wrong suffix, tampered, malicious --
    w["weights"] = random_tiny_clip_weights
    w["corrupt_weights"] = root / "corrupt.safetensors"
    w["corrupt_weights"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    w["vision_only"] = checkpoint / "vision.safetensors"
    w["txt_weights"] = root / "weights.txt"
    w["txt_weights"].write_text("weights")
    tampered = root / "tampered"
    tampered.mkdir()
    state = build_tiny_clip().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tampered / "vision.safetensors"))
    (tampered / "card.json").write_text(json.dumps({"sha256": file_sha256(tampered / "vision.safetensors"), "weights_file": "vision.safetensors"}))
    save_file({k: (v + 1e-3).contiguous() for k, v in state.items()}, str(tampered / "vision.safetensors"))
    w["tampered"] = tampered / "vision.safetensors"
    w["tampered_vision"] = root / "tampered-vision"
    w["tampered_vision"].mkdir()
    save_file({k: v.contiguous() for k, v in vision.items()}, str(w["tampered_vision"] / "vision.safetensors"))
    (w["tampered_vision"] / "card.json").write_text(json.dumps({"sha256": "0" * 64, "weights_file": "vision.safetensors"}))
    w["marker"] = root / "pwned"
    w["evil"] = root / "evil.pt"
    torch.save({"visual.conv1.weight": Evil(w["marker"])}, w["evil"])

    # -- sweep files --
    good = {
        "experiment": {"name": "bad-input", "model": f"tiny-clip@{random_tiny_clip_weights}", "train_data": "synthetic:train,n=12",
                       "eval_data": "synthetic:test,n=6", "epochs": 1, "batch_size": 6, "pgd_steps": 1, "eval_eps": ["4/255"],
                       "M": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "search": {"algorithm": "tpe", "num_trials": 1, "objectives": [{"metric": "pgd/eps4/tr1", "mode": "max"}]},
        "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}},
    }
    w["sweep"] = root / "good.yaml"
    w["sweep"].write_text(yaml.safe_dump(good))
    w["syntax_error"] = root / "syntax.yaml"
    w["syntax_error"].write_text("experiment:\n  name: x\n   model: [\n")
    w["binary_yaml"] = root / "binary.yaml"
    w["binary_yaml"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    w["list_yaml"] = root / "list.yaml"
    w["list_yaml"].write_text("- experiment\n- search\n")
    w["empty_yaml"] = root / "empty.yaml"
    w["empty_yaml"].write_text("# a sweep file with nothing in it yet\n")
    w["a_file"] = root / "regular-file"
    w["a_file"].write_text("a regular file: nothing can be created below it, not even by root")
    w["closed_port"] = _closed_port()
    return w


def snapshot(w: dict) -> dict:
    """Everything a case must leave alone: every run's record and every file's content under the store."""
    client = MlflowClient(w["uri"])
    runs = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            runs[run.info.run_id] = (run.info.status, run.info.end_time, run.data.params, run.data.metrics, run.data.tags)
    files = {str(p.relative_to(w["store"])): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(w["store"].rglob("*")) if p.is_file() and p.name != "mlflow.db"}
    return {"experiments": len(client.search_experiments()), "runs": runs, "files": files}


@pytest.fixture(scope="module")
def baseline(world) -> dict:
    return snapshot(world)


def _sweep(w, *extra, space=None):
    return ["--space", str(space or w["sweep"]), "--tracking-uri", w["uri"], "--storage-path", str(w["store"] / "ray"), *extra]


def _evaluate(w, *extra, data=None):
    """``--model`` (random tiny CLIP), ``--data`` (two good images), pgd at 2/255, then ``extra`` (later flags win)."""
    return ["--model", f"tiny-clip@{w['weights']}", "--data", data or f"captions-json:{w['good_json']},images={w['images']}",
            "--attacks", "pgd", "--eps", "2/255", "--no-checks", "--no-progress", *extra]


def _finetune(w, *extra):
    return ["--model", f"tiny-clip@{w['weights']}", "--train-data", "synthetic:train,n=12", "--eval-data", "synthetic:test,n=6",
            "--out", str(w["store"] / "finetune-out"), *extra]


def _convert(w, *extra, out=None):
    return ["convert", "--out", str(out or (w["root"] / "new-shards")), "--no-progress", *extra]


def _set(key_value: str) -> list[str]:
    return ["--set", key_value]


# (id, command, argv builder, regex the message must match)
CASES = [
    # ---- the sweep file ----
    ("yaml-syntax", "sweep", lambda w: _sweep(w, space=w["syntax_error"]), r"not valid YAML at line 3, column \d+.*fix the syntax"),
    ("sweep-file-missing", "sweep", lambda w: _sweep(w, space=w["root"] / "nope.yaml"), r"nope.yaml does not exist: pass --space"),
    ("sweep-file-is-a-folder", "sweep", lambda w: _sweep(w, space=w["root"]), r"is a folder: pass a YAML file"),
    ("sweep-file-binary", "sweep", lambda w: _sweep(w, space=w["binary_yaml"]), r"not UTF-8 text.*pass the YAML sweep file"),
    ("sweep-file-not-a-mapping", "sweep", lambda w: _sweep(w, space=w["list_yaml"]), r"must be a mapping with sections experiment, search"),
    ("sweep-file-empty", "sweep", lambda w: _sweep(w, space=w["empty_yaml"]), r"sweep file .*empty.yaml is empty: write its sections experiment:, search: and space:"),
    ("old-options-section", "sweep", lambda w: _sweep(w, *_set("experiment.options={optimizer: adamw}")),
     r"experiment.options is gone: write `optimizer: adamw` directly under experiment:"),
    ("ray-style-range", "sweep", lambda w: _sweep(w, *_set("space.a={uniform: [0.1, 1.0]}")),
     r"space: key 'a': `\{uniform: \[0.1, 1.0\]\}` is Ray Tune / W&B style: write it as `\{distribution: uniform, low: 0.1, high: 1.0\}`"),
    ("wandb-style-log-range", "sweep", lambda w: _sweep(w, *_set("space.lr={loguniform: [1e-5, 1e-3]}")),
     r"space: key 'lr': .* write it as `\{distribution: loguniform, low: 1e-5, high: 1e-3\}`"),
    ("seed-sampled-uniformly", "sweep", lambda w: _sweep(w, *_set("space.seed={distribution: uniform, low: 0, high: 10}")),
     r"space: key 'seed' takes integers, but uniform draws fractions: write it as `\{distribution: int, low: 0, high: 10\}`"),
    ("device-gpu", "sweep", lambda w: _sweep(w, *_set("experiment.device=gpu")), r"experiment.device': unknown device 'gpu': use auto .*cpu, cuda or cuda:N"),
    ("device-cuda-without-a-gpu", "sweep", lambda w: _sweep(w, *_set("experiment.device=cuda")),
     r"experiment.device 'cuda' runs each worker on a GPU, but resources.gpus_per_worker is 0: set device: auto"),
    ("device-cuda-on-a-cpu-machine", "sweep", lambda w: _sweep(w, *_set("experiment.device=cuda"), *_set("resources.gpus_per_worker=1")),
     r"a trial needs 1 GPUs .* has 0: set resources.gpus_per_worker to 0 \(CPU\) and device: auto"),
    ("sweep-wide-key-searched", "sweep", lambda w: _sweep(w, *_set("space.train_data={distribution: choice, values: [synthetic:train]}")),
     r"space: key 'train_data' is the same for every trial of a sweep .*set it under experiment:"),
    ("searched-models-of-two-tasks", "sweep", lambda w: _sweep(w, *_set("space.model={distribution: choice, values: [tiny-clip, tiny-albef-ve]}")),
     r"space: key 'model': its models do different tasks \(tiny-clip: retrieval, tiny-albef-ve: entailment\).*run the others as another sweep"),
    ("unknown-section", "sweep", lambda w: _sweep(w, *_set("trackingg.uri=x")), r"key 'trackingg': unknown key: remove it, or use one of experiment, resources, search, space, tracking, storage"),
    ("unknown-key", "sweep", lambda w: _sweep(w, *_set("experiment.learning_rate=0.1")), r"experiment.learning_rate': unknown key: remove it, or use one of model, task, defense, .*, name\n"),
    ("wrong-type", "sweep", lambda w: _sweep(w, *_set("experiment.epochs=ten")), r"experiment.epochs'.*valid integer.*'ten'"),
    ("negative-N", "sweep", lambda w: _sweep(w, *_set("space.N=-1")), r"space: key 'N' value -1: .*greater than or equal to 0"),
    ("zero-M", "sweep", lambda w: _sweep(w, *_set("experiment.M=0")), r"key 'experiment.M'.*greater than or equal to 1"),
    ("inverted-range", "sweep", lambda w: _sweep(w, *_set("space.a={distribution: loguniform, low: 0.1, high: 0.01}")),
     r"key 'a': low \(0.1\) must be below high \(0.01\)"),
    ("empty-int-range", "sweep", lambda w: _sweep(w, *_set("space.N={distribution: int, low: 2, high: 2}")), r"key 'N': low \(2\) must be below high \(2\)"),
    ("empty-choice", "sweep", lambda w: _sweep(w, *_set("space.lr={distribution: choice, values: []}")), r"space.lr.choice.values'.*at least 1"),
    ("eps-above-1", "sweep", lambda w: _sweep(w, *_set("space.eps=8")), r"eps 8 = 8 is outside \(0, 1\].*e.g. 4/255"),
    ("eps-zero", "sweep", lambda w: _sweep(w, *_set("experiment.eval_eps=[0]")), r"eps 0 = 0 is outside \(0, 1\]"),
    ("eps-not-a-number", "sweep", lambda w: _sweep(w, *_set("space.eps={distribution: choice, values: [4/0]}")), r"'4/0' is not a number or a fraction such as 4/255"),
    ("unknown-defense", "sweep", lambda w: _sweep(w, *_set("experiment.defense=madry")), r"experiment.defense'.*'mava', 'fare' or 'tecoa'"),
    ("unknown-attack", "sweep", lambda w: _sweep(w, *_set("experiment.eval_attacks=[fgsm]")), r"unknown attack 'fgsm': use some of pgd, apgd"),
    ("unknown-algorithm", "sweep", lambda w: _sweep(w, *_set("search.algorithm=bayes")), r"search.algorithm'.*'tpe', 'nsga2' or 'grid'"),
    ("objective-not-evaluated", "sweep", lambda w: _sweep(w, *_set("search.objectives=[{metric: pgd/eps8/tr1}]")),
     r"'pgd/eps8/tr1' is not produced by this sweep's evaluation.*valid: clean/tr1"),
    ("zero-trials", "sweep", lambda w: _sweep(w, *_set("search.num_trials=0")), r"search.num_trials'.*greater than or equal to 1"),
    ("unknown-distribution", "sweep", lambda w: _sweep(w, *_set("space.a={distribution: gaussian}")), r"space.a'.*'uniform', 'loguniform', 'int', 'choice', 'fixed'"),
    ("unsearchable-key", "sweep", lambda w: _sweep(w, *_set("space.zeta=1")), r"key 'zeta' is not a searchable training option; searchable: .*\ba, b, c\b"),
    ("initial-point-unknown-key", "sweep", lambda w: _sweep(w, *_set("search.initial_points=[{b: 0.4}]")), r"initial_points\[0\]: keys \['b'\] are not in space"),
    ("M-above-captions-available", "sweep", lambda w: _sweep(w, *_set("space.M={distribution: int, low: 1, high: 6}")),
     r"has only 5 captions but M=6.*lower M to <= 5"),
    ("M-above-captions-real-data", "sweep",
     lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['good_json']},images={w['images']}"), *_set("experiment.M=5")),
     r"has only 2 captions but M=5.*lower M to <= 2"),
    ("unknown-model-kind", "sweep", lambda w: _sweep(w, *_set("experiment.model=vit-xyz")), r"unknown model kind 'vit-xyz'.*use one of tiny-clip, tiny-albef, tiny-tcl, open_clip"),
    ("weights-missing", "sweep", lambda w: _sweep(w, *_set("experiment.model=tiny-clip@/nope/w.safetensors")), r"/nope/w.safetensors.*does not exist: check the path after '@'"),
    ("weights-corrupt", "sweep", lambda w: _sweep(w, *_set(f"experiment.model=tiny-clip@{w['corrupt_weights']}")), r"not a valid safetensors file.*re-export"),
    ("weights-of-another-architecture", "sweep", lambda w: _sweep(w, *_set(f"experiment.model=tiny-clip@{w['vision_only']}")),
     r"do not match the architecture.*missing.*Check that the model name"),
    ("weights-malicious-pickle", "sweep", lambda w: _sweep(w, *_set(f"experiment.model=tiny-clip@{w['evil']}")),
     r"could not be read safely with torch.load\(weights_only=True\).*convert it to safetensors"),
    ("weights-tampered", "sweep", lambda w: _sweep(w, *_set(f"experiment.model=tiny-clip@{w['tampered']}")), r"does not match the sha256 in .*card.json.*copy the checkpoint again"),
    ("weights-unsupported-suffix", "sweep", lambda w: _sweep(w, *_set(f"experiment.model=tiny-clip@{w['txt_weights']}")), r"unsupported suffix '.txt': use .safetensors"),
    ("unknown-data-kind", "sweep", lambda w: _sweep(w, *_set("experiment.train_data=coco:/data")), r"unknown data kind 'coco'.*valid kinds are synthetic, karpathy"),
    ("unknown-data-option", "sweep", lambda w: _sweep(w, *_set("experiment.train_data=synthetic:train,size=5")), r"unknown option 'size'.*allowed options are n, seed"),
    ("negative-n", "sweep", lambda w: _sweep(w, *_set("experiment.train_data=synthetic:train,n=-3")), r"bad value n='-3'.*must be at least 1"),
    ("data-file-missing", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=karpathy:/nope/dataset_coco.json,images={w['images']},split=test")),
     r"annotation file /nope/dataset_coco.json does not exist: check the path"),
    ("eval-data-file-missing", "sweep", lambda w: _sweep(w, *_set(f"experiment.eval_data=captions-json:/nope/test.json,images={w['images']}")),
     r"annotation file /nope/test.json does not exist"),
    ("data-not-json", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['invalid_json']},images={w['images']}")),
     r"is not valid JSON \(line 1, column \d+.*fix the file"),
    ("empty-dataset", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['empty_json']},images={w['images']}")),
     r"no images to load from .*empty.json: check that the annotation file lists images"),
    ("split-absent", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=karpathy:{w['karpathy']},images={w['images']},split=val")),
     r"split 'val' is not in .*splits present: test \(1 images\)"),
    ("images-folder-missing", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['good_json']},images=/nope/images")),
     r"images folder /nope/images does not exist: pass images="),
    ("image-file-missing", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['missing_image_json']},images={w['images']}")),
     r"1 of 3 images listed in .* do not exist: .*gone.png"),
    ("parquet-schema-mismatch", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=parquet:{w['bad_schema']}")),
     r"has schema \(img: binary, text: string\) but Parquet datasets need \(image: binary"),
    ("parquet-corrupt-shard", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=parquet:{w['corrupt_shards']}")),
     r"is not a readable Parquet file.*re-convert the dataset"),
    ("parquet-no-shards", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=parquet:{w['no_shards']}")), r"holds no \*.parquet shards: write them"),
    ("format-mix-up", "sweep", lambda w: _sweep(w, *_set(f"experiment.train_data=captions-json:{w['karpathy']},images={w['images']}")),
     r"is a Karpathy-format object, not a captions list: use karpathy:"),
    ("storage-not-writable", "sweep", lambda w: ["--space", str(w["sweep"]), "--tracking-uri", w["uri"], "--storage-path", str(w["a_file"] / "ray")],
     r"cannot write to .*regular-file/ray .*choose a writable --storage-path"),
    ("tracking-store-not-writable", "sweep", lambda w: ["--space", str(w["sweep"]), "--tracking-uri", f"sqlite:///{w['a_file']}/mlflow.db",
                                                        "--storage-path", str(w["store"] / "ray")],
     r"cannot write to .*regular-file .*choose a writable --tracking-uri"),
    ("artifacts-not-writable", "sweep", lambda w: _sweep(w, *_set(f"tracking.artifact_location={w['a_file']}/artifacts")),
     r"cannot write to .*regular-file/artifacts .*choose a writable tracking.artifact_location"),
    ("tracking-server-unreachable", "sweep", lambda w: ["--space", str(w["sweep"]), "--tracking-uri", f"http://127.0.0.1:{w['closed_port']}",
                                                         "--storage-path", str(w["store"] / "ray")],
     r"MLflow tracking at http://127.0.0.1:\d+ is unreachable \(.*[Cc]onnection refused\): start the tracking server"),
    ("more-cpus-than-the-machine", "sweep", lambda w: _sweep(w, *_set("resources.cpus_per_worker=512")),
     r"a trial needs 512 CPUs .* has \d+: lower resources.cpus_per_worker"),
    ("gpus-on-a-cpu-machine", "sweep", lambda w: _sweep(w, *_set("resources.gpus_per_worker=64")),
     r"a trial needs 64 GPUs .*set resources.gpus_per_worker to 0"),
    ("resume-without-a-sweep", "sweep", lambda w: _sweep(w, "--resume"), r"no sweep named bad-input to resume .*run without --resume"),
    ("resume-unknown-id", "sweep", lambda w: _sweep(w, "--resume", "bad-input-20000101-000000"), r"--resume bad-input-20000101-000000: no sweep of that id .*pass one of those ids"),
    ("set-without-equals", "sweep", lambda w: _sweep(w, "--set", "experiment.epochs"), r"--set 'experiment.epochs' is not KEY=VALUE: write e.g."),
    ("set-value-not-yaml", "sweep", lambda w: _sweep(w, "--set", "experiment.name=[oops"), r"--set experiment.name=\[oops: the value is not valid YAML.*quote it"),
    ("missing-space-argument", "sweep", lambda w: ["--tracking-uri", w["uri"]], r"the following arguments are required: --space"),
    # ---- python -m platform.evaluate ----
    ("evaluate-unknown-attack", "evaluate", lambda w: _evaluate(w, "--attacks", "pgd,fgsm"), r"unknown attack 'fgsm': use one or more of pgd, apgd"),
    ("evaluate-eps-above-1", "evaluate", lambda w: _evaluate(w, "--eps", "8"), r"eps '8' = 8 is outside \(0, 1\]"),
    ("evaluate-zero-images", "evaluate", lambda w: _evaluate(w, "--max-images", "0"), r"--max-images: invalid _positive_int value|0 must be at least 1"),
    ("evaluate-cuda-without-gpu", "evaluate", lambda w: _evaluate(w, "--device", "cuda:7"), r"device 'cuda:7' asked for but no CUDA device|unknown device"),
    ("evaluate-checkpoint-missing", "evaluate", lambda w: _evaluate(w, "--checkpoint", "/nope/epoch-3"), r"checkpoint /nope/epoch-3 does not exist: give a checkpoint directory"),
    ("evaluate-checkpoint-tampered", "evaluate", lambda w: _evaluate(w, "--checkpoint", str(w["tampered_vision"])),
     r"vision.safetensors does not match the sha256 in .*card.json \(card 0{64}, file [0-9a-f]{64}\).*copy the checkpoint again"),
    ("evaluate-checkpoint-another-model", "evaluate", lambda w: _evaluate(w, "--checkpoint", str(w["weights"])), r"do not match the architecture.*unexpected"),
    ("evaluate-surrogate-weights-alone", "evaluate", lambda w: _evaluate(w, "--surrogate-checkpoint", str(w["checkpoint"])), r"--surrogate-checkpoint needs --surrogate"),
    ("evaluate-output-not-writable", "evaluate", lambda w: _evaluate(w, "--output", str(w["a_file"] / "results.json")),
     r"cannot write to .*regular-file .*choose a writable folder for --output"),
    ("evaluate-corrupt-image", "evaluate", lambda w: _evaluate(w, data=f"captions-json:{w['corrupt_json']},images={w['images']}"),
     r"image '.*corrupt.png' listed in .*corrupt-image.json could not be decoded.*check the file or remove it"),
    ("evaluate-mlm-missing", "evaluate", lambda w: _evaluate(w, "--word-candidates", "mlm:/nope/bert"), r"--word-candidates: /nope/bert is not a folder: give a local folder"),
    ("evaluate-no-captions", "evaluate", lambda w: _evaluate(w, data=f"captions-json:{w['no_captions_json']},images={w['images']}"),
     r"entry 0 of .*no-captions.json has a 'caption' that is neither.*must look like"),
    # ---- python -m platform.finetune ----
    ("finetune-unknown-defense", "finetune", lambda w: _finetune(w, "--defense", "madry"), r"command line: key 'defense'.*'mava', 'fare' or 'tecoa'"),
    ("finetune-zero-epochs", "finetune", lambda w: _finetune(w, "--epochs", "0"), r"key 'epochs'.*greater than or equal to 1"),
    ("finetune-lr-not-a-number", "finetune", lambda w: _finetune(w, "--set", "lr=abc"), r"key 'lr'.*valid number.*'abc'"),
    ("finetune-eps-above-1", "finetune", lambda w: _finetune(w, "--set", "eps=8"), r"eps '8' = 8 is outside \(0, 1\]"),
    ("finetune-all-weights-zero", "finetune", lambda w: _finetune(w, "--set", "a=0", "--set", "b=0", "--set", "c=0"), r"a, b and c are all 0.*set at least one > 0"),
    ("finetune-unknown-option", "finetune", lambda w: _finetune(w, "--set", "gamma=1"), r"key 'gamma': unknown key\nvalid keys: model, task, defense"),
    ("finetune-out-not-writable", "finetune", lambda w: _finetune(w, "--out", str(w["a_file"] / "run")), r"cannot write to .*regular-file/run .*choose a writable --out folder"),
    ("finetune-bad-data-spec", "finetune", lambda w: _finetune(w, "--train-data", "synthetic:validation"), r"bad split \(train or test\) 'validation'.*not a synthetic split"),
    ("finetune-M-above-captions", "finetune", lambda w: _finetune(w, "--train-data", f"captions-json:{w['good_json']},images={w['images']}", "--set", "M=3"),
     r"has only 2 captions but M=3.*lower M to <= 2"),
    # ---- python -m platform.data convert ----
    ("data-no-subcommand", "data", lambda w: [], r"the following arguments are required: command|invalid choice"),
    ("data-karpathy-without-split", "data", lambda w: _convert(w, "--karpathy", str(w["karpathy"]), "--images", str(w["images"])), r"--karpathy needs --split"),
    ("data-split-with-captions-json", "data", lambda w: _convert(w, "--captions-json", str(w["good_json"]), "--images", str(w["images"]), "--split", "test"),
     r"--split applies to --karpathy only"),
    ("data-images-folder-missing", "data", lambda w: _convert(w, "--captions-json", str(w["good_json"]), "--images", "/nope/images"), r"images folder /nope/images does not exist"),
    ("data-corrupt-image", "data", lambda w: _convert(w, "--captions-json", str(w["corrupt_json"]), "--images", str(w["images"])),
     r"image .*corrupt.png \(id corrupt.png\) is not a readable image.*fix or remove it"),
    ("data-empty-source", "data", lambda w: _convert(w, "--captions-json", str(w["empty_json"]), "--images", str(w["images"])), r"the source lists no images: check the annotation file"),
    ("data-out-holds-shards", "data", lambda w: _convert(w, "--captions-json", str(w["good_json"]), "--images", str(w["images"]), out=w["shards"]),
     r"already holds 1 shards \(e.g. part-00000.parquet\): remove them or choose another folder"),
    ("data-out-not-writable", "data", lambda w: _convert(w, "--captions-json", str(w["good_json"]), "--images", str(w["images"]), out=w["a_file"] / "shards"),
     r"--out .*regular-file/shards cannot be created.*choose a writable folder"),
    ("data-zero-shard-size", "data", lambda w: _convert(w, "--captions-json", str(w["good_json"]), "--images", str(w["images"]), "--shard-size", "0"),
     r"shard size 0 and row group size \d+ must be at least 1"),
    ("data-annotation-not-utf8", "data", lambda w: _convert(w, "--captions-json", str(w["binary_json"]), "--images", str(w["images"])), r"is not UTF-8 text.*point to the captions JSON"),
]


def run_in_process(command: str, argv: list[str], capfd) -> tuple[int, str]:
    """``python -m platform.<command> ARGV`` in this process: (exit code, everything printed)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: COMMANDS[command](argv))
    out, err = capfd.readouterr()
    return exit_info.value.code, out + err


@pytest.fixture()
def no_real_work(monkeypatch):
    """A case that passes every check would start real work: make that fail at once, loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("the input passed validation: the command would have started work")

    monkeypatch.setattr(platform.sweep, "init_ray", refuse)
    monkeypatch.setattr(platform.finetune, "evaluate_model", refuse)
    monkeypatch.setattr(platform.finetune, "run_training", refuse)
    # platform.data convert keeps its real writer: it is what finds corrupt images and full folders.


def test_there_are_at_least_30_distinct_mistakes():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert {case[1] for case in CASES} == set(COMMANDS)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_each_mistake_is_refused_clearly_and_touches_nothing(case, world, baseline, capfd, no_real_work, tmp_path):
    name, command, build, message = case
    argv = build(world)
    # A sweep case records into a store that does not exist yet: refusing the input must not create it.
    fresh_store = tmp_path / "mlflow.db"
    argv = [f"sqlite:///{fresh_store}" if arg == world["uri"] else arg for arg in argv]
    code, printed = run_in_process(command, argv, capfd)
    assert code == EXIT_USER_ERROR, printed
    assert "Traceback" not in printed, printed
    assert re.search(message, printed, flags=re.DOTALL), printed
    if "usage:" not in printed:  # argparse's own errors print the usage line; ours say what to do
        error_lines = [line for line in printed.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, printed  # one message, not a cascade
        assert any(word in printed.lower() for word in FIX_WORDS), printed
    assert snapshot(world) == baseline
    assert not fresh_store.exists(), "an MLflow database was created before the input was validated"
    assert not world["marker"].exists(), "a pickle was unpickled without restriction"


CHECK_CASES = ["sweep-file-empty", "old-options-section", "ray-style-range", "seed-sampled-uniformly", "device-gpu",
               "device-cuda-on-a-cpu-machine", "unknown-model-kind", "weights-corrupt", "data-file-missing", "storage-not-writable"]


@pytest.mark.parametrize("name", CHECK_CASES)
def test_check_refuses_what_a_run_refuses(name, world, baseline, capfd, no_real_work, tmp_path):
    """``--check`` runs the same checks: the same exit code and message, and still nothing written."""
    _, command, build, message = next(case for case in CASES if case[0] == name)
    fresh_store = tmp_path / "mlflow.db"
    argv = [f"sqlite:///{fresh_store}" if arg == world["uri"] else arg for arg in build(world)]
    code, printed = run_in_process(command, [*argv, "--check"], capfd)
    assert code == EXIT_USER_ERROR and re.search(message, printed, flags=re.DOTALL), printed
    assert sum(line.startswith("error: ") for line in printed.splitlines()) == 1, printed
    assert snapshot(world) == baseline and not fresh_store.exists()


SUBPROCESS_CASES = ["yaml-syntax", "evaluate-checkpoint-tampered", "finetune-unknown-defense", "data-corrupt-image"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_on_the_terminal_there_is_one_message_and_no_traceback(name, world, baseline):
    _, command, build, message = next(case for case in CASES if case[0] == name)
    result = subprocess.run([sys.executable, "-m", f"platform.{command}", *build(world)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == EXIT_USER_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert re.search(message, result.stderr, flags=re.DOTALL), result.stderr
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
    assert snapshot(world) == baseline
    assert not world["marker"].exists()
