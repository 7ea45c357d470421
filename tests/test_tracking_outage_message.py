"""A sweep stopped by a lost tracking server gets one message naming the server and ``--resume``.

An outage is told from the error itself (a failed connection anywhere in its chain), not
only from whether the server answers when the error reaches the driver: the server may be
back by then (it came back after MLflow's retries ran out), and the writes in between are
lost all the same. CI once saw exactly that end in a raw traceback and exit 1.
"""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException

from platform import tracking_recovery
from trainables.errors import UserError

URI = "http://127.0.0.1:5999"


def _mlflow_error_after(cause: BaseException) -> MlflowException:
    """What MLflow's ``http_request`` raises: its own exception, raised while handling ``cause``."""
    try:
        try:
            raise cause
        except Exception as error:
            raise MlflowException(f"API request to {URI}/api/2.0/mlflow/runs/log-batch failed with exception {error}")
    except MlflowException as wrapped:
        return wrapped


@pytest.mark.parametrize("server_answers_now", [True, False])
def test_a_refused_connection_is_an_outage_whether_or_not_the_server_is_back(monkeypatch, server_answers_now):
    monkeypatch.setattr(tracking_recovery, "_answers", lambda uri: server_answers_now)
    error = _mlflow_error_after(requests.exceptions.ConnectionError("Max retries exceeded: Connection refused"))
    with pytest.raises(UserError, match=r"stopped answering during sweep s-1 .* start the server again, then continue with --resume s-1"):
        with tracking_recovery.tracking_server_outage(URI, "s-1"):
            raise error


def test_another_error_from_a_server_that_answers_is_raised_as_it_is(monkeypatch):
    monkeypatch.setattr(tracking_recovery, "_answers", lambda uri: True)
    error = MlflowException("INVALID_PARAMETER_VALUE: a bad request")
    with pytest.raises(MlflowException, match="a bad request"):
        with tracking_recovery.tracking_server_outage(URI, "s-1"):
            raise error


def test_a_local_store_is_never_called_a_server_outage(monkeypatch):
    monkeypatch.setattr(tracking_recovery, "_answers", lambda uri: False)
    with pytest.raises(ConnectionRefusedError):
        with tracking_recovery.tracking_server_outage("sqlite:///mlflow.db", "s-1"):
            raise ConnectionRefusedError("not a server")
