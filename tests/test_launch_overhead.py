"""The per-trial savings of ``platform.launch`` (issue 19, item 2) use settings Ray still has.

A renamed Ray Train flag would be ignored silently and the sweep would only get slower, so
the flag is checked against the names Ray Train propagates from the trial to its controller and
workers, and the Tuner is checked to reuse trial actors.
"""

from __future__ import annotations

from platform.launch import LOCAL_RAY_ENV, build_tuner


def test_the_local_ray_flags_are_ones_ray_train_reads_and_propagates():
    from ray.train.v2._internal import constants

    assert set(LOCAL_RAY_ENV) <= constants.ENV_VARS_TO_PROPAGATE
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR in LOCAL_RAY_ENV
    assert LOCAL_RAY_ENV[constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"


def test_trials_reuse_the_finished_trials_actor(monkeypatch):
    import platform.launch as launch

    captured = {}

    class FakeTuner:
        def __init__(self, trainable, param_space, tune_config, run_config):
            captured["tune_config"] = tune_config

    monkeypatch.setattr(launch.tune, "Tuner", FakeTuner)
    monkeypatch.setattr(launch, "searcher", lambda spec, study_name: None)
    monkeypatch.setattr(launch, "scheduler", lambda spec: None)
    monkeypatch.setattr(launch, "num_samples", lambda spec: 2)
    monkeypatch.setattr(launch, "tune_space", lambda spec: {})

    class Spec:
        space: dict = {}
        resources = type("Resources", (), {"max_concurrent_trials": 1, "model_dump": lambda self, include: {}})()

        def fixed_options(self):
            return {}

        def objective_metrics(self):
            return []

    pinned = type("Pinned", (), {"worker_options": lambda self: {}, "model": type("M", (), {"base_weights_sha256": ""})()})()
    locations = type("Locations", (), {"storage_path": "/tmp/unused"})()
    build_tuner(Spec(), "s", locations, tracker=None, resume=False, pinned=pinned)
    assert captured["tune_config"].reuse_actors is True
