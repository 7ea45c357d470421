"""Export a robust vision encoder in its base model's own format: ``python -m platform.export``.

    python -m platform.export --run RUN_ID [--tracking-uri URI] --out DIR
    python -m platform.export --checkpoint CHECKPOINT_DIR --out DIR

The fine-tuned vision weights are merged into the base model they were trained from,
and the whole model is written the way its library saves it, so people load it without
this platform:

* ``tiny-clip`` and ``open_clip:NAME``: ``DIR/open_clip_model.safetensors`` (every weight
  of the CLIP, the robust ``visual.*`` included) and ``DIR/<ARCH>.json``, the open_clip
  model config. Load with ``open_clip.add_model_config("DIR/<ARCH>.json")`` (needed when
  the architecture is not an open_clip built-in, e.g. ``tiny-clip``) then
  ``open_clip.create_model_and_transforms("<ARCH>", pretrained="DIR/open_clip_model.safetensors")``.
  A model loaded from OpenAI's release file (QuickGELU) is exported as ``<NAME>-quickgelu``.
* ``hf-clip``, ``hf-blip-itr``, ``hf-blip-cap``: a ``save_pretrained`` folder (weights,
  config, tokenizer, image processor) that ``CLIPModel`` / ``BlipForImageTextRetrieval`` /
  ``BlipForConditionalGeneration.from_pretrained(DIR)`` loads.

``DIR/mava_export.json`` records the format, the base model and the load call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, CLIPModel

from platform.cli import check_writable, run_cli
from platform.compare import check_tracking_store
from platform.tracking import CHECKPOINT_ARTIFACT_DIR
from trainables.checkpoint import VISION_FILE, read_checkpoint_state
from trainables.errors import UserError
from trainables.models import ModelSpec, load_model, parse_model_spec
from trainables.models.hf_blip import BlipCaptionVLP, BlipRetrievalVLP
from trainables.models.hf_clip import HfClipVLP, image_statistics, load_pretrained, load_tokenizer, read_model_config
from trainables.models.open_clip_model import OpenClipVLP
from trainables.models.robust_checkpoint import load_robust_vision
from trainables.models.tiny_clip import TinyClipConfig

MANIFEST_FILE = "mava_export.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TINY_CLIP_ARCH = "tiny-clip"
# Files of a save_pretrained folder that describe preprocessing (not weights): copied as they are.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class HfKind:
    """How a transformers kind is rebuilt: its class, the model_type in config.json, and the platform wrapper."""

    model_class: type
    model_type: str
    wrapper: type


HF_KINDS = {
    "hf-clip": HfKind(CLIPModel, "clip", HfClipVLP),
    "hf-blip-itr": HfKind(BlipForImageTextRetrieval, "blip", BlipRetrievalVLP),
    "hf-blip-cap": HfKind(BlipForConditionalGeneration, "blip", BlipCaptionVLP),
}
OPEN_CLIP_KINDS = ("tiny-clip", "open_clip")


@dataclass(frozen=True)
class Manifest:
    """What ``mava_export.json`` records; ``platform_spec`` reloads the export with the platform (``{dir}`` = the folder)."""

    format: str  # "open_clip" or "transformers"
    base_model: str  # the model spec the encoder was fine-tuned from
    platform_spec: str
    architecture: str  # open_clip model name, or the transformers class
    files: list[str]
    load: str  # the library call that loads it


def tiny_clip_model_config(config: TinyClipConfig = TinyClipConfig()) -> dict:
    """open_clip's model config (the JSON of its ``model_configs/``) for the tiny architecture of ``build_tiny_clip``."""
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"image_size": config.image_size, "layers": config.vision_layers, "width": config.vision_width,
                       "head_width": 32, "patch_size": config.patch_size},
        "text_cfg": {"context_length": config.context_length, "vocab_size": 49408, "width": config.text_width,
                     "heads": config.text_width // 32, "layers": config.text_layers},
    }


def _uses_quick_gelu(model: OpenClipVLP) -> bool:
    blocks = getattr(getattr(model.vision, "transformer", None), "resblocks", [])
    return any(isinstance(module, QuickGELU) for block in blocks for module in block.modules())


def _open_clip_architecture(parsed: ModelSpec, model: OpenClipVLP) -> tuple[str, dict, bool]:
    """(architecture name, its model config, whether open_clip knows it as a built-in)."""
    if parsed.kind == TINY_CLIP_ARCH:
        return TINY_CLIP_ARCH, tiny_clip_model_config(), False
    name, config = parsed.name, open_clip.get_model_config(parsed.name)
    if _uses_quick_gelu(model) and not config.get("quick_gelu", False):
        # OpenAI's weights were trained with QuickGELU; the plain name would build nn.GELU and embed differently.
        name, config = f"{name}-quickgelu", {**config, "quick_gelu": True}
    return name, config, name in open_clip.list_models() and open_clip.get_model_config(name) == config


def export_open_clip(parsed: ModelSpec, model: OpenClipVLP, out: Path) -> Manifest:
    name, config, builtin = _open_clip_architecture(parsed, model)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.clip_state_dict().items()}, str(out / OPEN_CLIP_WEIGHTS))
    (out / f"{name}.json").write_text(json.dumps(config, indent=2))
    register = "" if builtin else f'open_clip.add_model_config("{out}/{name}.json"); '
    spec = (f"tiny-clip@{{dir}}/{OPEN_CLIP_WEIGHTS}" if parsed.kind == TINY_CLIP_ARCH
            else f"open_clip:{name}@{{dir}}/{OPEN_CLIP_WEIGHTS}")
    return Manifest("open_clip", str(parsed), spec, name, [OPEN_CLIP_WEIGHTS, f"{name}.json"],
                    f'{register}open_clip.create_model_and_transforms("{name}", pretrained="{out}/{OPEN_CLIP_WEIGHTS}")')


def export_transformers(parsed: ModelSpec, vision_file: Path, out: Path) -> Manifest:
    kind = HF_KINDS[parsed.kind]
    source = Path(parsed.name)
    read_model_config(source, parsed.kind, kind.model_class.__name__, kind.model_type)
    hf_model = load_pretrained(kind.model_class, source)
    tokenizer = load_tokenizer(source)
    mean, std = image_statistics(source)
    # The wrapper shares hf_model's vision modules, so loading the robust weights into it updates hf_model in place.
    load_robust_vision(kind.wrapper(hf_model, tokenizer, mean, std, str(parsed)), vision_file)
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return Manifest("transformers", str(parsed), f"{parsed.kind}:{{dir}}", kind.model_class.__name__,
                    sorted(p.name for p in out.iterdir()), f'transformers.{kind.model_class.__name__}.from_pretrained("{out}")')


def export_robust(base_spec: str, vision_file: Path, out: Path) -> Manifest:
    """Write the base model of ``base_spec`` with the robust vision weights of ``vision_file`` into ``out``."""
    parsed = parse_model_spec(base_spec)
    if parsed.kind not in OPEN_CLIP_KINDS and parsed.kind not in HF_KINDS:
        raise UserError(f"no export for model kind {parsed.kind!r}: platform.export writes {', '.join((*OPEN_CLIP_KINDS, *HF_KINDS))}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder: choose a new folder (an export never overwrites)")
    check_writable(out, "--out")
    if parsed.kind in HF_KINDS:
        manifest = export_transformers(parsed, vision_file, out)
    else:
        model = load_model(parsed)
        load_robust_vision(model, vision_file)
        manifest = export_open_clip(parsed, model, out)
    (out / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2))
    return manifest


def source_from_checkpoint(directory: Path) -> tuple[str, Path]:
    """(base model spec, vision weights) of a training checkpoint folder (its state.json names the model)."""
    state = read_checkpoint_state(directory)
    return state["config"]["model"], directory / VISION_FILE


def source_from_run(client: MlflowClient, run_id: str, staging: Path) -> tuple[str, Path]:
    """(base model spec, downloaded vision weights and card) of a trial's MLflow run."""
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise UserError(f"no MLflow run {run_id!r} ({str(error).splitlines()[0][:200]}): pass the run id of a trial "
                        "(the trials table of the report, or the MLflow UI), and --tracking-uri of its store") from None
    if "model" not in run.data.params:
        raise UserError(f"run {run_id} has no 'model' param, so it is not a trial of a sweep: pass a trial's run id")
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)}
    if VISION_FILE not in names:
        raise UserError(f"run {run_id} has no {CHECKPOINT_ARTIFACT_DIR}/{VISION_FILE} artifact (the trial did not finish): "
                        "export a finished trial, or a checkpoint folder with --checkpoint")
    folder = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR, str(staging)))
    return run.data.params["model"], folder / VISION_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_ID", help="MLflow run id of a finished trial (its checkpoint/ artifact)")
    source.add_argument("--checkpoint", metavar="DIR", help="a training checkpoint folder (vision.safetensors + state.json)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI for --run (default sqlite:///mlflow.db)")
    parser.add_argument("--out", required=True, help="new folder to write the exported model into")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    with tempfile.TemporaryDirectory() as staging:
        if args.run:
            check_tracking_store(args.tracking_uri)
            spec, vision = source_from_run(MlflowClient(args.tracking_uri), args.run, Path(staging))
        else:
            spec, vision = source_from_checkpoint(Path(args.checkpoint).expanduser().resolve())
        manifest = export_robust(spec, vision, out)
    print(f"exported the robust encoder of {manifest.base_model} as {manifest.format} ({manifest.architecture}) to {out}\n"
          f"load it with: {manifest.load}")
    return 0


if __name__ == "__main__":
    run_cli(main)
