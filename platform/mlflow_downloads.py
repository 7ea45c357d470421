"""MLflow artifact downloads without MLflow's progress bar.

MLflow draws a bar per download. The platform downloads small things many times (each trial's
ranks file for a sweep's summary, each trial's example pictures for the report, the checkpoint
that the registry wraps as a pyfunc), which filled a sweep's output with dozens of bars.
"""

from __future__ import annotations

import contextlib
import os

PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each download


@contextlib.contextmanager
def quiet_downloads():
    """Downloads inside the block draw no progress bar; the variable's previous value is restored after."""
    before = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PROGRESS_BAR_ENV]
        else:
            os.environ[PROGRESS_BAR_ENV] = before
