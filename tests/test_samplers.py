"""Every searcher a sweep file can ask for survives Ray Tune's pickling, and an NSGA-II sweep resumes.

Ray Tune pickles the searcher whenever it saves the experiment (and unpickles it on
``--resume``). Optuna 5.1's ``NSGAIISampler`` holds a thread lock and could not be
pickled, so every ``algorithm: nsga2`` sweep crashed in ``Tuner.fit()``.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal

import pytest
from ray import tune

from platform.search import searcher, tune_space
from platform.sweep_spec import parse_sweep_spec

OBJECTIVES = {
    "tpe": [{"metric": "pgd/eps4/tr1", "mode": "max"}],
    "nsga2": [{"metric": "pgd/eps4/tr1", "mode": "max"}, {"metric": "clean/tr1", "mode": "max"}],
    "grid": [{"metric": "pgd/eps4/tr1", "mode": "max"}],
}


def sweep_spec(algorithm: str, initial_points: bool, num_trials: int = 4):
    search = {"algorithm": algorithm, "seed": 0, "objectives": OBJECTIVES[algorithm]}
    if algorithm == "grid":
        space = {"a": {"distribution": "choice", "values": [0.001, 0.01]}}
    else:
        search["num_trials"] = num_trials
        space = {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1},
                 "N": {"distribution": "int", "low": 1, "high": 3}}
        if initial_points:
            search["initial_points"] = [{"a": 0.002, "N": 3}]
    data = {
        "experiment": {"name": f"pickle-{algorithm}", "model": "tiny-clip", "train_data": "synthetic:train,n=8",
                       "eval_data": "synthetic:test,n=4"},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "search": search,
        "space": space,
    }
    return parse_sweep_spec(data, f"{algorithm}.yaml")


@pytest.mark.parametrize("initial_points", [False, True], ids=["no-initial-points", "initial-points"])
@pytest.mark.parametrize("algorithm", ["tpe", "nsga2", "grid"])
def test_every_searcher_pickles_and_still_suggests_after_unpickling(algorithm, initial_points):
    if algorithm == "grid" and initial_points:
        pytest.skip("grid search runs every point of the grid; it takes no initial points")
    spec = sweep_spec(algorithm, initial_points)
    search = searcher(spec, study_name=f"study-{algorithm}")
    if algorithm == "grid":
        assert search is None  # Tune's own variant generator runs the grid; nothing of ours is pickled
        return
    # What Tune does with the searcher: set it up with the space, pickle it with the experiment state.
    assert search.set_search_properties(None, None, tune_space(spec))
    first = search.suggest("trial-0")
    search.on_trial_complete("trial-0", {"final/pgd/eps4/tr1": 12.0, "final/clean/tr1": 40.0, **first})
    restored = pickle.loads(pickle.dumps(search))
    copied = copy.deepcopy(search)
    for clone in (restored, copied):
        suggestion = clone.suggest("trial-1")
        assert set(suggestion) >= {"a", "N"}
        assert 0.001 <= suggestion["a"] <= 0.1 and 1 <= suggestion["N"] <= 3
    if initial_points:
        assert first["a"] == pytest.approx(0.002) and first["N"] == 3


@pytest.mark.slow
def test_an_nsga2_sweep_interrupted_after_a_trial_resumes_to_the_end(ray_session, tmp_path):
    spec = sweep_spec("nsga2", initial_points=True, num_trials=2)
    interrupt, driver = tmp_path / "interrupt-once", os.getpid()
    interrupt.touch()

    def fake_trial(config):
        # Stands in for a training trial: the two objectives the spec names, as a final epoch reports them.
        # Defined here so that Ray pickles it by value (workers cannot import the tests folder).
        tune.report({"final/pgd/eps4/tr1": 10.0 * config["a"] + config["N"], "final/clean/tr1": 50.0 - config["N"]})
        if interrupt.exists():
            # What Ctrl-C does to a sweep, without touching pytest's own SIGINT handler: Tune ends a run
            # on SIGUSR1 exactly as on SIGINT, saving the experiment (and its pickled searcher).
            interrupt.unlink()
            os.kill(driver, signal.SIGUSR1)

    def finished(results) -> list[str]:
        return [r.metrics["trial_id"] for r in results if r.metrics and r.metrics.get("final/clean/tr1") is not None]

    first = tune.Tuner(
        fake_trial,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(search_alg=searcher(spec, study_name="resume-nsga2"), num_samples=2),
        run_config=tune.RunConfig(name="nsga2-resume", storage_path=str(tmp_path), verbose=0),
    ).fit()
    before = finished(first)
    assert len(before) <= 1  # interrupted during the first trial

    path = str(tmp_path / "nsga2-resume")
    assert tune.Tuner.can_restore(path)  # the searcher (NSGA-II sampler inside) was pickled with the experiment
    after = finished(tune.Tuner.restore(path, trainable=fake_trial, resume_unfinished=True).fit())
    assert len(after) == len(set(after)) == 2 and set(before) <= set(after)  # each trial ran once, the first kept
