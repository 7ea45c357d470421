"""The registered best trial is an MLflow model that embeds images: loaded from the registry, and served.

The trial is a run holding a tiny-CLIP robust checkpoint, as a sweep's tracker logs it;
``register_best`` is what ``platform.sweep`` calls for the best trial.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform.export import MANIFEST_FILE
from platform.registry import PYFUNC_CODE
from platform.tracking import register_best
from servers import free_port, stop_group, wait_until_answering
from test_export import write_robust_checkpoint
from trainables.checkpoint import VISION_FILE
from trainables.models import load_model
from trainables.models.robust_checkpoint import load_robust_vision

MODEL_NAME = "tiny-robust-vision"
SERVE_START_SECONDS = 300  # `mlflow models serve` starts a fresh interpreter and server: a minute or more on a loaded machine


@pytest.fixture(scope="module")
def registered(random_tiny_clip_weights, tmp_path_factory) -> dict:
    """A trial run with a robust tiny-CLIP checkpoint, registered as ``MODEL_NAME@best``."""
    root = tmp_path_factory.mktemp("pyfunc")
    spec = f"tiny-clip@{random_tiny_clip_weights}"
    checkpoint = write_robust_checkpoint(spec, root / "ckpt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("pyfunc", artifact_location=str(root / "artifacts")))
    client.log_param(run.info.run_id, "model", spec)
    client.log_artifact(run.info.run_id, str(checkpoint / VISION_FILE), "checkpoint")
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):  # MLflow's download bars go to sys.stderr
        version = register_best(client, run.info.run_id, MODEL_NAME)
    robust = load_model(spec)
    load_robust_vision(robust, checkpoint)
    return {"uri": uri, "client": client, "version": version, "robust": robust, "root": root, "printed": printed.getvalue()}


def images(count: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).random((count, 3, size, size), dtype=np.float32)


def test_registering_draws_no_download_progress_bar(registered):
    assert "Downloading artifacts" not in registered["printed"]


def test_the_best_version_loads_as_a_pyfunc_that_embeds_images(registered):
    assert f'MANIFEST_FILE = "{MANIFEST_FILE}"' in PYFUNC_CODE.read_text()  # the pyfunc reads the export's manifest
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registered["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@best")
    finally:
        mlflow.set_tracking_uri(previous)
    batch = images(4, registered["robust"].image_size)
    embeddings = model.predict(batch)
    with torch.no_grad():
        expected = registered["robust"].encode_image(torch.from_numpy(batch)).numpy()
    assert embeddings.shape == expected.shape and np.allclose(embeddings, expected, atol=1e-5)

    signature = model.metadata.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 32, 32)
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, expected.shape[1])
    example = model.input_example
    assert example.shape == (1, 3, 32, 32) and model.predict(example).shape == (1, expected.shape[1])
    with pytest.raises(Exception, match=r"pixels must lie in \[0, 1\]"):
        model.predict(batch * 255)


@pytest.mark.slow
def test_mlflow_models_serve_answers_one_request(registered, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    env.pop("PYTHONPATH", None)
    log = tmp_path / "serve.log"
    # From a folder outside the repository: the served model must import trainables from its own code/ folder.
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@best",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    batch = images(2, registered["robust"].image_size)
    try:
        wait_until_answering(server, f"http://127.0.0.1:{port}/ping", SERVE_START_SECONDS, log)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": batch.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            response = json.loads(answer.read())
    finally:
        stop_group(server)
    with torch.no_grad():
        expected = registered["robust"].encode_image(torch.from_numpy(batch)).numpy()
    served = np.asarray(response["predictions"], dtype=np.float32)
    assert served.shape == expected.shape and np.allclose(served, expected, atol=1e-4)
    if os.environ.get("MAVA_SCREENSHOT_DIR"):  # the request/response for the issue note
        Path(os.environ["MAVA_SCREENSHOT_DIR"], "pyfunc-response.json").write_text(json.dumps(
            {"request": {"inputs": f"float32 array of shape {list(batch.shape)}"}, "response": {"predictions": served.round(4).tolist()}}))
