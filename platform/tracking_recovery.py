"""What the driver does when MLflow missed something: epochs recovered from checkpoints, and a lost tracking server.

Only the driver writes to MLflow. When it cannot (the tracking server is down, the
driver itself dies), Ray Train goes on persisting each epoch's checkpoint, whose
``state.json`` holds that epoch's metrics: those are the record MLflow is filled from
afterwards, so a per-epoch history never has a gap.
"""

from __future__ import annotations

import json
import urllib.request
from contextlib import contextmanager

import pyarrow.fs
import requests

from trainables.errors import UserError
from trainables.names import EPOCH, STATE_FILE

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names in a run's storage


def checkpointed_epochs(storage_path: str, train_run_name: str) -> dict[int, dict]:
    """epoch -> metrics of every epoch checkpoint that a Train run persisted (a local path or a pyarrow URI such as s3://)."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(f"{storage_path.rstrip('/')}/{train_run_name}")
    found = {}
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        state_path = f"{info.path}/{STATE_FILE}"
        if filesystem.get_file_info(state_path).type != pyarrow.fs.FileType.File:
            continue  # a marker checkpoint (a NaN loss) has no epoch
        with filesystem.open_input_stream(state_path) as stream:
            state = json.loads(stream.read().decode())
        found[int(state[EPOCH])] = state["metrics"]
    return found


@contextmanager
def tracking_server_outage(tracking_uri: str, sweep_id: str):
    """Turn a sweep stopped by a tracking server that went away into one message naming the server and the resume command.

    A shorter outage never gets here: every MLflow request is retried (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    default 7 with exponential backoff, about 4 minutes), while the driver waits and the trials train on.
    """
    try:
        yield
    except Exception as error:
        # A failed connection in the error's chain is an outage even if the server answers again by now (it came
        # back after MLflow's retries ran out: the writes in between are lost all the same, and --resume restores them).
        remote = tracking_uri.startswith(("http://", "https://"))  # checked first: a local store has no /health to ask
        outage = remote and (_lost_connection(error) or not _answers(tracking_uri))
        if not outage:
            raise  # the error is its own message
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"the MLflow tracking server at {tracking_uri} stopped answering during sweep {sweep_id} and did not "
                        f"come back within MLflow's retries ({reason}); what was recorded is kept: start the server again, "
                        f"then continue with --resume {sweep_id}") from None


def _lost_connection(error: BaseException | None) -> bool:
    """Whether a connection failed anywhere in ``error``'s chain (MLflow wraps requests' error in its own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, requests.exceptions.ConnectionError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _answers(tracking_uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10) as response:
            return response.status == 200
    except OSError:
        return False
