"""The best trial as an MLflow model: a pyfunc that embeds images, with the weights and the code to rebuild it.

``log_pyfunc_model`` exports the trial's robust encoder in its base model's own format
(``platform.export``), wraps it in the pyfunc of ``platform/pyfunc_model.py`` with a
signature and an input example, and logs it under the trial run's ``model/`` artifact;
``platform.tracking.register_best`` registers that folder. Then
``mlflow.pyfunc.load_model("models:/NAME@best")`` returns a model that embeds images,
and ``mlflow models serve -m models:/NAME@best --env-manager local`` serves it.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from platform.export import MANIFEST_FILE, export_robust, source_from_run
from trainables.models import load_model

PYFUNC_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")
# The served model imports trainables from its own code/ folder, not from a checkout of this repository.
TRAINABLES_DIR = Path(__file__).resolve().parent.parent / "trainables"
MODEL_ARTIFACT_DIR = "model"
ENCODER_ARTIFACT = "encoder"  # platform/pyfunc_model.py reads context.artifacts[ENCODER_ARTIFACT]
EXAMPLE_GREY = 0.5  # the input example: one mid-grey image
REQUIREMENTS = ("torch", "open_clip_torch", "transformers", "safetensors", "numpy", "pydantic", "mlflow")


def signature_and_example(export_dir: Path) -> tuple[ModelSignature, np.ndarray]:
    """The pyfunc's tensor signature ((-1, 3, S, S) -> (-1, D) float32) and a one-image input example."""
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    model = load_model(manifest["platform_spec"].replace("{dir}", str(export_dir)))
    size = model.image_size
    example = np.full((1, 3, size, size), EXAMPLE_GREY, dtype=np.float32)
    with torch.no_grad():
        dim = model.encode_image(torch.from_numpy(example)).shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(dim)))]))
    return signature, example


def save_pyfunc(base_spec: str, vision_file: Path, path: Path) -> Path:
    """Write the MLflow model folder of a robust encoder (base model spec + fine-tuned vision weights) to ``path``."""
    with tempfile.TemporaryDirectory() as staging:
        export_dir = Path(staging) / ENCODER_ARTIFACT
        export_robust(base_spec, vision_file, export_dir)
        signature, example = signature_and_example(export_dir)
        mlflow.pyfunc.save_model(
            str(path), python_model=str(PYFUNC_CODE), artifacts={ENCODER_ARTIFACT: str(export_dir)},
            code_paths=[str(TRAINABLES_DIR)], signature=signature, input_example=example,
            # Pinned to what trained it; listing them skips MLflow's slow import-tracing inference.
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        )
    return path


def log_pyfunc_model(client: MlflowClient, run_id: str) -> str:
    """Build the pyfunc of a finished trial and log it as the run's ``model/`` artifact; returns its artifact URI."""
    with tempfile.TemporaryDirectory() as staging:
        base_spec, vision_file = source_from_run(client, run_id, Path(staging))
        folder = save_pyfunc(base_spec, vision_file, Path(staging) / MODEL_ARTIFACT_DIR)
        client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT_DIR)
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_DIR}"
