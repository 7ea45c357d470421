"""Embedded base weights are resolved once, at the edge, and every worker on every node loads exactly those bytes.

The two-node test starts a ``ray.cluster_utils.Cluster`` of two 1-CPU nodes in a
subprocess (this session's Ray stays untouched) and loads the pinned spec with one
Ray task per node: both see the same sha256 and the same tensors, neither pretrains
(``tiny_clip.pretrain`` raises there) and neither writes its own cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainables.errors import UserError
from trainables.models import parse_model_spec
from trainables.models import embedded
from trainables.models.embedded import base_weights_sha256, resolve_model, verify_base_weights
from trainables.models.weights import CONTENT_ADDRESSED, file_sha256, read_state_dict
from trainables.names import BASE_WEIGHTS_SHA256, MODEL_FAMILY_TAG, PINNED_MODELS_KEY, PINNED_SPECS_KEY, SCORING_TAG, TASK_TAG

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def pinned(random_tiny_clip_weights, tmp_path, monkeypatch):
    """``tiny-clip`` resolved on the 'driver' (its cached weights: the random tiny CLIP) into a store folder."""
    calls = []

    def cached_weights() -> Path:
        calls.append(1)
        return random_tiny_clip_weights

    monkeypatch.setitem(embedded.EMBEDDED_WEIGHTS, "tiny-clip", cached_weights)
    resolved = resolve_model("tiny-clip", tmp_path / "store")
    return SimpleNamespace(resolved=resolved, calls=calls, store=tmp_path / "store", source=random_tiny_clip_weights)


def test_an_embedded_spec_resolves_to_a_content_addressed_copy(pinned):
    resolved = pinned.resolved
    assert resolved.spec.kind == "tiny-clip" and resolved.spec.weights is not None
    path = Path(resolved.spec.weights)
    assert path.parent == pinned.store and CONTENT_ADDRESSED.search(path.name)["sha256"] == resolved.base_weights_sha256
    assert resolved.base_weights_sha256 == file_sha256(pinned.source) == file_sha256(path)
    assert pinned.calls == [1]  # the machine's cached weights were asked for once, here
    # The canonical string parses back to the same spec (what workers receive).
    assert parse_model_spec(str(resolved.spec)) == resolved.spec
    again = resolve_model("tiny-clip", pinned.store)
    assert again == resolved


def test_a_spec_with_weights_records_their_sha256_without_pretraining(random_tiny_clip_weights, monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED_WEIGHTS, "tiny-clip", lambda: pytest.fail("an explicit weights file needs no pretraining"))
    resolved = resolve_model(f"tiny-clip@{random_tiny_clip_weights}")
    assert resolved.base_weights_sha256 == file_sha256(random_tiny_clip_weights)
    assert resolved.spec.weights == str(random_tiny_clip_weights.resolve())


def test_a_content_addressed_file_with_other_bytes_is_refused(pinned):
    path = Path(pinned.resolved.spec.weights)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not hash to the sha256 in its name"):
        read_state_dict(path)
    with pytest.raises(UserError, match="does not hash to the sha256 in its name"):
        verify_base_weights(str(pinned.resolved.spec), pinned.resolved.base_weights_sha256)


def test_a_worker_refuses_weights_other_than_the_sweeps(pinned, random_tiny_clip_weights):
    with pytest.raises(UserError, match="but the sweep resolved"):
        verify_base_weights(str(pinned.resolved.spec), "0" * 64)
    with pytest.raises(UserError, match="names no weights file"):
        base_weights_sha256(parse_model_spec("tiny-clip"))


def test_every_trial_records_the_base_weights_sha256_and_the_kinds_family(tmp_path):
    """The tracker's params and tags of a trial: sha256 of the pinned weights; family and task from the model kind."""
    from mlflow.tracking import MlflowClient

    from platform.tracking import MlflowTrialTracker, get_or_create_experiment, get_or_create_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, "pins", str(tmp_path / "artifacts"))
    parent = get_or_create_parent_run(client, experiment_id, "pins-1", {}, {})
    tracker = MlflowTrialTracker(uri, experiment_id, parent, "pins-1")
    sha = "ab" * 32
    options = {"model": "hf-blip-itr:/models/blip-itm", "eval_attacks": ["pgd"]}
    pinned_models = [{"name": options["model"], "spec": options["model"], "sha256": sha}]
    trial = SimpleNamespace(trial_id="t1", config={"train": options, "sweep": {"searched": [], "workers_per_trial": 1, PINNED_MODELS_KEY: pinned_models}})
    tracker.on_trial_start(0, [], trial)
    tracker.flush()  # the tracker writes on its own thread
    run = client.get_run(tracker._runs["t1"])
    assert run.data.params[BASE_WEIGHTS_SHA256] == sha and run.data.tags[BASE_WEIGHTS_SHA256] == sha
    # The old substring guess ("clip" in the spec, else the kind) tagged this run "hf-blip-itr".
    assert run.data.tags[MODEL_FAMILY_TAG] == "blip"
    assert run.data.tags[TASK_TAG] == "retrieval"
    assert run.data.tags[SCORING_TAG] == "itc+itm@128"  # BLIP re-scores the ITC top-k_test (default 128) by ITC + ITM


def test_the_edge_parses_specs_once_and_workers_get_canonical_strings(pinned, tmp_path, monkeypatch):
    """Relative data paths become absolute in the driver; the workers' options are the pinned, canonical specs."""
    from platform.specs import pin_specs
    from trainables.ray_worker import worker_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    specs = pin_specs({"model": "tiny-clip", "train_data": "synthetic:train,n=12", "eval_data": "parquet:shards"},
                      str(tmp_path / "ray"))
    options, models = specs.worker_options(), specs.pinned_models()
    assert options["eval_data"] == f"parquet:{tmp_path / 'shards'}" and options["train_data"] == "synthetic:train,n=12,seed=0"
    (model,) = models
    assert model["name"] == "tiny-clip" and model["sha256"] == pinned.resolved.base_weights_sha256
    assert Path(model["spec"].partition("@")[2]).parent == tmp_path / "ray" / "base-weights"
    config = {"train": {"model": "tiny-clip", "lr": 1e-4}, "sweep": {"searched": ["a"], PINNED_SPECS_KEY: options, PINNED_MODELS_KEY: models},
              "a": 0.1}
    assert worker_options(config) == {**options, "model": model["spec"], "lr": 1e-4, "a": 0.1}


def test_a_searched_model_pins_every_choice_and_each_trial_gets_its_own(pinned, random_tiny_clip_weights, tmp_path):
    """``space: model: {choice: [...]}``: the edge pins each value; a trial's workers load the one it drew, with its sha256."""
    from platform.specs import pin_specs
    from trainables.ray_worker import pinned_model, worker_options

    copy = tmp_path / "other.safetensors"
    copy.write_bytes(random_tiny_clip_weights.read_bytes())
    names = ["tiny-clip", f"tiny-clip@{copy}"]
    specs = pin_specs({"model": "tiny-clip", "train_data": "synthetic:train,n=12", "eval_data": "synthetic:test,n=4"},
                      str(tmp_path / "ray"), searched=["model"], models=names)
    models = specs.pinned_models()
    assert [model["name"] for model in models] == names
    assert models[1]["spec"] == f"tiny-clip@{copy}" and models[1]["sha256"] == file_sha256(copy)
    assert specs.base_weights_param() == ", ".join(f"{name}={file_sha256(random_tiny_clip_weights)}" for name in names)
    for name, model in zip(names, models):
        config = {"train": {"model": "tiny-clip"}, "sweep": {"searched": ["model"], PINNED_MODELS_KEY: models}, "model": name}
        assert pinned_model(config) == model and worker_options(config)["model"] == model["spec"]
    # A trial config written without the sweep's edge (no pinned models): the spec as written, no sha256 to check.
    unpinned = {"train": {"model": "tiny-clip", "lr": 1e-4}, "sweep": {"searched": []}}
    assert pinned_model(unpinned) is None and worker_options(unpinned) == {"model": "tiny-clip", "lr": 1e-4}


def _load_on_two_nodes(spec: str, expected_sha256: str, empty_cache: str) -> list[dict]:
    """Run in a subprocess: a two-node Ray cluster, one task pinned to each node loading ``spec``."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        assert len(nodes) == 2, nodes

        @ray.remote(num_cpus=1)
        def load(spec: str, expected: str) -> dict:
            import torch

            import trainables.models.tiny_clip as tiny_clip
            from trainables.models import load_model
            from trainables.models.embedded import base_weights_sha256 as sha_of
            from trainables.models.embedded import verify_base_weights as verify

            def refuse(*args, **kwargs):
                raise AssertionError("a worker started pretraining tiny-clip")

            tiny_clip.pretrain = refuse  # the loader must never get there
            verify(spec, expected)
            model = load_model(spec)
            tensors = hashlib.sha256()
            for key, value in sorted(model.state_dict().items()):
                tensors.update(key.encode() + value.detach().to(torch.float32).contiguous().numpy().tobytes())
            cache = os.environ["MAVA_CACHE_DIR"]
            return {"node": ray.get_runtime_context().get_node_id(), "sha256": sha_of(parse_model_spec(spec)),
                    "tensors": tensors.hexdigest(), "cache_files": sorted(os.listdir(cache)) if os.path.isdir(cache) else []}

        runtime_env = {"env_vars": {"MAVA_CACHE_DIR": empty_cache}}
        refs = [load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                             runtime_env=runtime_env).remote(spec, expected_sha256) for node in nodes]
        return ray.get(refs, timeout=240)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a two-node Ray cluster: about 2 min on the loaded 2-core machine
def test_two_workers_on_two_nodes_load_the_same_bytes_and_never_pretrain(pinned, tmp_path):
    empty_cache = tmp_path / "worker-cache"
    empty_cache.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    completed = subprocess.run([sys.executable, __file__, str(pinned.resolved.spec), pinned.resolved.base_weights_sha256,
                                str(empty_cache)], cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len({r["node"] for r in results}) == 2  # one worker on each node
    assert {r["sha256"] for r in results} == {pinned.resolved.base_weights_sha256}
    assert len({r["tensors"] for r in results}) == 1
    assert all(r["cache_files"] == [] for r in results) and list(empty_cache.iterdir()) == []


if __name__ == "__main__":
    print(json.dumps(_load_on_two_nodes(sys.argv[1], sys.argv[2], sys.argv[3])))


@pytest.mark.parametrize("attacks, searched, pinned_to_store", [
    (("pgd", "sga"), (), True),  # a text attack uses the embedded MLM: pinned
    (("pgd",), (), False),  # no text attack: nothing to pin
    (("co-attack",), ("word_candidates",), False),  # searched: each trial's own value stands
])
def test_the_embedded_mlm_is_pretrained_in_the_driver_and_pinned_for_the_workers(attacks, searched, pinned_to_store,
                                                                                  tmp_path, monkeypatch):
    from platform.specs import pin_specs
    from trainables.models import tiny_mlm

    cached = tmp_path / "cache" / "tiny-mlm-0123456789ab"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(tiny_mlm, "ensure_tiny_mlm", lambda: calls.append(1) or cached)
    options = {"model": "tiny-clip@/w.safetensors", "train_data": "synthetic:train,n=8", "eval_data": "synthetic:test,n=4",
               "eval_attacks": list(attacks), "word_candidates": "tiny-mlm"}
    monkeypatch.setattr("platform.specs.resolve_model", lambda spec, store: SimpleNamespace(spec=spec))
    workers = pin_specs(options, str(tmp_path / "storage"), searched=searched).worker_options()
    if pinned_to_store:
        copy = tmp_path / "storage" / embedded.BASE_WEIGHTS_DIR / cached.name
        assert workers["word_candidates"] == f"mlm:{copy}" and (copy / "config.json").is_file() and calls == [1]
    else:
        assert "word_candidates" not in workers and calls == []
