"""platform.export: each export loads with its own library alone and embeds images as the platform does.

Every base model is a tiny random instance of the real class (tests/test_real_models.py
writes them as users receive them); the "robust" checkpoint is its vision encoder with
perturbed weights, so an export that kept the base weights would embed differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from transformers import BlipForImageTextRetrieval, CLIPModel

from platform.export import MANIFEST_FILE, OPEN_CLIP_WEIGHTS, main
from test_real_models import CLIP_MEAN, CLIP_STD, SIZE, open_clip_arch, write_blip_dir, write_clip_dir  # noqa: F401 (fixture)
from trainables.checkpoint import STATE_FILE, VISION_FILE
from trainables.errors import UserError
from trainables.models import load_model
from trainables.models.robust_checkpoint import load_robust_vision

TOLERANCE = 1e-5


def write_robust_checkpoint(spec: str, folder: Path) -> Path:
    """A checkpoint folder as training writes it: the base model's vision weights, perturbed, and a state.json naming the base."""
    model = load_model(spec)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.vision.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.vision.state_dict().items()}, str(folder / VISION_FILE))
    (folder / STATE_FILE).write_text(json.dumps({"epoch": 1, "config": {"model": spec}, "metrics": {}}))
    return folder


def platform_embeddings(spec: str, checkpoint: Path, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust, base) embeddings the platform computes for [0, 1] ``pixels``."""
    base = load_model(spec)
    robust = load_model(spec)
    load_robust_vision(robust, checkpoint)
    with torch.no_grad():
        return robust.encode_image(pixels), base.encode_image(pixels)


def export(checkpoint: Path, out: Path) -> dict:
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return json.loads((out / MANIFEST_FILE).read_text())


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def assert_same_as_platform(library: torch.Tensor, robust: torch.Tensor, base: torch.Tensor) -> None:
    assert library.shape == robust.shape
    torch.testing.assert_close(library, robust, atol=TOLERANCE, rtol=TOLERANCE)
    assert (library - base).abs().max() > 100 * TOLERANCE  # the robust weights, not the base ones


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, MlflowClient, str]:
    """(URI, client, experiment id) of one SQLite MLflow store for this module (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("export-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("export", artifact_location=str(root / "artifacts"))


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_tiny_clip_exports_to_an_open_clip_file_with_its_config(random_tiny_clip_weights, tmp_path, pixels):
    spec = f"tiny-clip@{random_tiny_clip_weights}"
    checkpoint = write_robust_checkpoint(spec, tmp_path / "ckpt")
    manifest = export(checkpoint, tmp_path / "out")
    assert manifest["format"] == "open_clip" and manifest["architecture"] == "tiny-clip"

    # open_clip alone: register the exported config, build the model from the weights file.
    open_clip.add_model_config(tmp_path / "out" / "tiny-clip.json")
    clip, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(tmp_path / "out" / OPEN_CLIP_WEIGHTS))
    normalize = preprocess.transforms[-1]
    with torch.no_grad():
        library = clip.eval().encode_image(normalise(pixels, normalize.mean, normalize.std))
    assert_same_as_platform(library, *platform_embeddings(spec, checkpoint, pixels))


def test_an_openai_quickgelu_model_exports_under_a_quickgelu_architecture(open_clip_arch, tmp_path, pixels):
    torch.manual_seed(0)
    state = open_clip.create_model(open_clip_arch, pretrained=None, force_quick_gelu=True).state_dict()
    # OpenAI's release format keeps these metadata entries; the platform reads them as "built with QuickGELU".
    weights = tmp_path / "openai.pt"
    torch.save({**state, "input_resolution": torch.tensor(SIZE)}, weights)
    spec = f"open_clip:{open_clip_arch}@{weights}"
    checkpoint = write_robust_checkpoint(spec, tmp_path / "ckpt")
    manifest = export(checkpoint, tmp_path / "out")
    name = f"{open_clip_arch}-quickgelu"
    assert manifest["architecture"] == name and json.loads((tmp_path / "out" / f"{name}.json").read_text())["quick_gelu"] is True

    open_clip.add_model_config(tmp_path / "out" / f"{name}.json")
    clip, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(tmp_path / "out" / OPEN_CLIP_WEIGHTS))
    with torch.no_grad():
        library = clip.eval().encode_image(normalise(pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    assert_same_as_platform(library, *platform_embeddings(spec, checkpoint, pixels))


def test_hf_clip_exports_a_save_pretrained_folder(tmp_path, pixels):
    spec = f"hf-clip:{write_clip_dir(tmp_path / 'base')}"
    checkpoint = write_robust_checkpoint(spec, tmp_path / "ckpt")
    manifest = export(checkpoint, tmp_path / "out")
    assert manifest["format"] == "transformers" and manifest["architecture"] == "CLIPModel"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= set(manifest["files"])

    clip = CLIPModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        library = clip.get_image_features(pixel_values=normalise(pixels, CLIP_MEAN, CLIP_STD)).pooler_output
    assert_same_as_platform(library, *platform_embeddings(spec, checkpoint, pixels))


def test_hf_blip_retrieval_exports_a_save_pretrained_folder(tmp_path, pixels):
    spec = f"hf-blip-itr:{write_blip_dir(tmp_path / 'base', BlipForImageTextRetrieval)}"
    checkpoint = write_robust_checkpoint(spec, tmp_path / "ckpt")
    export(checkpoint, tmp_path / "out")

    blip = BlipForImageTextRetrieval.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        cls = blip.vision_model(pixel_values=normalise(pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)).last_hidden_state[:, 0]
        library = blip.vision_proj(cls)  # BLIP's ITC image embedding
    assert_same_as_platform(library, *platform_embeddings(spec, checkpoint, pixels))


def test_a_trial_run_exports_from_its_mlflow_checkpoint(random_tiny_clip_weights, store, tmp_path, pixels):
    spec = f"tiny-clip@{random_tiny_clip_weights}"
    checkpoint = write_robust_checkpoint(spec, tmp_path / "ckpt")
    uri, client, experiment_id = store
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "model", spec)
    client.log_artifact(run.info.run_id, str(checkpoint / VISION_FILE), "checkpoint")

    assert main(["--run", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    exported = load_model(f"tiny-clip@{tmp_path / 'out' / OPEN_CLIP_WEIGHTS}")  # the whole CLIP file loads as the base model too
    with torch.no_grad():
        assert_same_as_platform(exported.encode_image(pixels), *platform_embeddings(spec, checkpoint, pixels))


def test_export_refuses_a_used_folder_and_a_run_without_checkpoint(random_tiny_clip_weights, store, tmp_path):
    checkpoint = write_robust_checkpoint(f"tiny-clip@{random_tiny_clip_weights}", tmp_path / "ckpt")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "used")])
    assert (tmp_path / "used" / "x").read_text() == "keep me"

    uri, client, experiment_id = store
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "model", "tiny-clip")
    with pytest.raises(UserError, match="has no checkpoint/vision.safetensors artifact"):
        main(["--run", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "out")])
