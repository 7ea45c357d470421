"""The per-trial savings of ``platform.launch`` (issue 19, item 2) use settings Ray still has.

A renamed Ray Train flag would be ignored silently and the sweep would only get slower, so
the flags are checked against the names Ray Train propagates from the trial to its controller and
workers.
"""

from __future__ import annotations

from platform.launch import LOCAL_RAY_ENV


def test_the_local_ray_flags_are_ones_ray_train_reads_and_propagates():
    from ray.train.v2._internal import constants

    assert set(LOCAL_RAY_ENV) <= constants.ENV_VARS_TO_PROPAGATE
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR in LOCAL_RAY_ENV
    assert LOCAL_RAY_ENV[constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"
    # The controller's poll interval: shorter than Ray's default, and a number the controller can read.
    interval = float(LOCAL_RAY_ENV[constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR])
    assert 0 < interval < constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
