"""The MLflow pyfunc of a registered robust encoder: [0, 1] images -> robust image embeddings.

MLflow loads this file itself ("models from code": ``python_model=<this file>``), so
nothing is unpickled and the served process never imports this repository's
``platform`` package (whose name shadows the standard library's). The model's
``code/trainables`` folder (``code_paths``) is put on ``sys.path`` by MLflow, and the
artifact ``encoder`` is the base model exported with the robust weights
(``platform.export``): ``load_model`` rebuilds it exactly as training saw it.

Input: a float32 array (N, 3, H, W) of RGB pixels in [0, 1] (H = W = the model's
image size; the platform normalises inside). Output: float32 (N, D) embeddings, not
L2-normalised (cosine similarity is what retrieval uses).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch

# platform.export.MANIFEST_FILE; spelled here because this file must not import platform.
MANIFEST_FILE = "mava_export.json"
ENCODER_ARTIFACT = "encoder"


class RobustEncoder(mlflow.pyfunc.PythonModel):
    """Images (N, 3, H, W) in [0, 1] -> the robust vision encoder's embeddings (N, D)."""

    def load_context(self, context) -> None:
        from trainables.models import load_model  # from the model's code/ folder

        folder = Path(context.artifacts[ENCODER_ARTIFACT])
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        self.model = load_model(manifest["platform_spec"].replace("{dir}", str(folder)))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        pixels = np.asarray(model_input, dtype=np.float32)
        size = self.model.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"expected images of shape (N, 3, {size}, {size}), got {pixels.shape}: "
                             f"send RGB pixels resized to {size}x{size}, channels first")
        if pixels.size and (pixels.min() < 0 or pixels.max() > 1):
            raise ValueError("pixels must lie in [0, 1] (divide 8-bit images by 255; do not normalise: the model does)")
        with torch.no_grad():
            return self.model.encode_image(torch.from_numpy(pixels)).numpy()


mlflow.models.set_model(RobustEncoder())
