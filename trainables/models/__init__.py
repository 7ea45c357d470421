"""Model specs -> models behind the one :class:`VLPModel` interface.

A model spec is a string a user writes in YAML or on the command line::

    tiny-clip                              embedded default (pretrained and cached on first use)
    tiny-clip@/abs/weights.safetensors     the tiny architecture with these weights
    tiny-albef                             embedded fusion model: a small ALBEF (pretrained and cached on first use)
    tiny-tcl                               embedded fusion model: the same architecture pretrained with TCL's objectives
    tiny-albef@/abs/weights.safetensors    the tiny ALBEF architecture with these weights (likewise tiny-tcl@...)
    open_clip:ViT-B-16@/abs/weights.pt     a named open_clip architecture, weights from a local file
                                           (also OpenAI's TorchScript release file, e.g. ViT-B-16.pt)
    hf-clip:/abs/dir                       transformers CLIPModel saved with save_pretrained
    hf-blip-itr:/abs/dir                   transformers BlipForImageTextRetrieval (ITC + ITM re-ranking)
    hf-blip-cap:/abs/dir                   transformers BlipForConditionalGeneration (captioning, no text encoder)
    albef:/abs/bert-dir@/abs/ckpt.pth      ALBEF (fusion encoder): tokenizer + config_bert.json dir, checkpoint file
    tcl:/abs/bert-dir@/abs/ckpt.pth        TCL (ALBEF's architecture and checkpoint layout)
    tiny-albef-ve[@/abs/w.safetensors]     embedded tiny-albef fine-tuned for visual entailment (cached on first use)
    tiny-tcl-ve[@/abs/w.safetensors]       embedded tiny-tcl fine-tuned for visual entailment by the same recipe
    tiny-albef-vg[@/abs/w.safetensors]     embedded tiny-albef fine-tuned for grounding (cached on first use)
    tiny-tcl-vg[@/abs/w.safetensors]       embedded tiny-tcl fine-tuned for grounding by the same recipe

Nothing is ever downloaded. Kinds live in the plain dict ``MODEL_KINDS`` below.
docs/models-and-data.md describes each kind and its checks.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch

from trainables.errors import UserError
from trainables.models.albef import AlbefVLP, TclVLP, load_albef
from trainables.models.base import VLPModel
from trainables.models.tiny_albef_ve import TinyAlbefVeVLP, TinyTclVeVLP, load_tiny_albef_ve
from trainables.models.tiny_albef_vg import TinyAlbefVgVLP, TinyTclVgVLP, load_tiny_albef_vg
from trainables.models.hf_blip import BlipCaptionVLP, BlipRetrievalVLP, load_hf_blip_caption, load_hf_blip_retrieval
from trainables.models.hf_clip import HfClipVLP, load_hf_clip
from trainables.models.open_clip_model import OpenClipVLP, build_open_clip
from trainables.models.tiny_albef import CONFIGS, load_tiny_albef
from trainables.models.tiny_clip import TinyClipConfig, build_tiny_clip, load_tiny_clip
from trainables.models.weights import load_strict, read_state_dict
from trainables.tasks import Task


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind[:name][@weights]``."""

    kind: str
    name: str | None
    weights: str | None

    def __str__(self) -> str:
        text = self.kind + (f":{self.name}" if self.name else "")
        return text + (f"@{self.weights}" if self.weights else "")


def _load_tiny_clip(spec: ModelSpec) -> VLPModel:
    config = TinyClipConfig()
    if spec.weights is None:
        clip = load_tiny_clip(config)
    else:
        clip = build_tiny_clip(config)
        load_strict(clip, read_state_dict(spec.weights), source=spec.weights)
    return build_open_clip(clip, str(spec))


# Entries of OpenAI's release files that are not weights of open_clip's CLIP: metadata
# that OpenAI's build_model() also drops, and the causal mask that tracing stored.
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _is_torchscript_archive(path: Path) -> bool:
    # The test torch.load applies: a zip whose top folder holds constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())


def _read_open_clip_weights(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is OpenAI's release format) of an open_clip weights file.

    OpenAI's ``ViT-B-16.pt`` is a TorchScript archive that ``torch.load(weights_only=True)``
    refuses. ``torch.jit.load`` reads it without unpickling arbitrary Python (TorchScript
    archives hold tensors and TorchScript code, which ``state_dict()`` never runs), so it
    is the one exception to ``read_state_dict``. OpenAI state dicts use open_clip's key
    names; their metadata entries are dropped and fp16 tensors cast to float32.
    """
    if not _is_torchscript_archive(Path(path)):
        state = read_state_dict(path)
        is_openai = any(key in state for key in _OPENAI_NON_WEIGHTS[:3])
    else:
        with warnings.catch_warnings():
            # torch deprecates TorchScript; reading a release archive's tensors is all we do with it.
            warnings.simplefilter("ignore", FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        is_openai = True
    if is_openai:
        state = {k: v.float() for k, v in state.items() if k not in _OPENAI_NON_WEIGHTS}
    return state, is_openai


def _load_open_clip(spec: ModelSpec) -> VLPModel:
    known = open_clip.list_models()
    if spec.name not in known:
        raise UserError(
            f"unknown open_clip architecture {spec.name!r} in model spec {str(spec)!r}: "
            f"use one of open_clip.list_models(), e.g. {', '.join(n for n in known if n.startswith('ViT-B'))}"
        )
    text_config = open_clip.get_model_config(spec.name)["text_cfg"]
    needs_hub = [key for key in ("hf_model_name", "hf_tokenizer_name") if key in text_config]
    if needs_hub:
        raise UserError(
            f"open_clip architecture {spec.name!r} builds its text side from the Hugging Face hub "
            f"({', '.join(f'{k}={text_config[k]!r}' for k in needs_hub)}), which needs a download: "
            "use an architecture with CLIP's own tokenizer (e.g. ViT-B-16), or hf-clip:/abs/dir"
        )
    if spec.weights is None:
        raise UserError(
            f"model spec {str(spec)!r} names no weights file: write open_clip:{spec.name}@/abs/path/to/weights "
            "(nothing is downloaded at run time)"
        )
    state, is_openai = _read_open_clip_weights(spec.weights)
    # OpenAI trained with QuickGELU; open_clip's plain names (ViT-B-16) use nn.GELU.
    clip = open_clip.create_model(spec.name, pretrained=None, force_quick_gelu=is_openai)
    load_strict(clip, state, source=spec.weights)
    return build_open_clip(clip, str(spec))


def _load_hf_clip(spec: ModelSpec) -> VLPModel:
    return load_hf_clip(Path(spec.name), str(spec))


def _load_hf_blip_retrieval(spec: ModelSpec) -> VLPModel:
    return load_hf_blip_retrieval(Path(spec.name), str(spec))


def _load_hf_blip_caption(spec: ModelSpec) -> VLPModel:
    return load_hf_blip_caption(Path(spec.name), str(spec))


def _load_tiny_albef_ve(spec: ModelSpec) -> VLPModel:
    return load_tiny_albef_ve(str(spec), spec.weights, family="tcl" if spec.kind == "tiny-tcl-ve" else "albef")


def _load_tiny_albef_vg(spec: ModelSpec) -> VLPModel:
    return load_tiny_albef_vg(str(spec), spec.weights, family="tcl" if spec.kind == "tiny-tcl-vg" else "albef")


def _load_albef(spec: ModelSpec) -> VLPModel:
    return load_albef(Path(spec.name), spec.weights, str(spec), family=spec.kind)


def _load_tiny_albef(spec: ModelSpec) -> VLPModel:
    return load_tiny_albef(str(spec), spec.weights, CONFIGS[spec.kind.removeprefix("tiny-")])  # tiny-albef, tiny-tcl


@dataclass(frozen=True)
class ModelKind:
    """One kind of model spec.

    Attributes:
        needs_name: the spec needs a ``:NAME`` part (an architecture or a directory).
        loader: builds the model from a parsed spec.
        model_class: the VLPModel class the loader returns.
        family: the family tag of its runs (``mava.model_family``): ``clip``, ``blip``, ...
        tasks: the tasks it can be fine-tuned and evaluated for, its main one (a run's task) first.
    """

    needs_name: bool
    loader: Callable[[ModelSpec], VLPModel]
    model_class: type[VLPModel]
    family: str
    tasks: tuple[Task, ...]

    @property
    def task(self) -> Task:
        """The task a run of this kind trains and evaluates for."""
        return self.tasks[0]


MODEL_KINDS: dict[str, ModelKind] = {
    "tiny-clip": ModelKind(False, _load_tiny_clip, OpenClipVLP, "clip", (Task.RETRIEVAL,)),
    "tiny-albef": ModelKind(False, _load_tiny_albef, AlbefVLP, "albef", (Task.RETRIEVAL, Task.GROUNDING)),  # ITC + ITM heads: retrieval, and grounding by GradCAM of ITM
    "tiny-tcl": ModelKind(False, _load_tiny_albef, TclVLP, "tcl", (Task.RETRIEVAL, Task.GROUNDING)),  # ITC + ITM heads: retrieval, and grounding by GradCAM of ITM
    "open_clip": ModelKind(True, _load_open_clip, OpenClipVLP, "clip", (Task.RETRIEVAL,)),
    "hf-clip": ModelKind(True, _load_hf_clip, HfClipVLP, "clip", (Task.RETRIEVAL,)),
    "hf-blip-itr": ModelKind(True, _load_hf_blip_retrieval, BlipRetrievalVLP, "blip", (Task.RETRIEVAL,)),
    "hf-blip-cap": ModelKind(True, _load_hf_blip_caption, BlipCaptionVLP, "blip", (Task.CAPTIONING,)),
    "albef": ModelKind(True, _load_albef, AlbefVLP, "albef", (Task.RETRIEVAL, Task.ENTAILMENT, Task.GROUNDING)),
    "tcl": ModelKind(True, _load_albef, TclVLP, "tcl", (Task.RETRIEVAL, Task.ENTAILMENT, Task.GROUNDING)),
    "tiny-albef-ve": ModelKind(False, _load_tiny_albef_ve, TinyAlbefVeVLP, "albef", (Task.ENTAILMENT,)),
    "tiny-tcl-ve": ModelKind(False, _load_tiny_albef_ve, TinyTclVeVLP, "tcl", (Task.ENTAILMENT,)),
    "tiny-albef-vg": ModelKind(False, _load_tiny_albef_vg, TinyAlbefVgVLP, "albef", (Task.GROUNDING, Task.RETRIEVAL)),
    "tiny-tcl-vg": ModelKind(False, _load_tiny_albef_vg, TinyTclVgVLP, "tcl", (Task.GROUNDING, Task.RETRIEVAL)),
}
# Kinds whose name is a local directory (made absolute at parsing: Ray workers run elsewhere);
# their weights come from that directory, so they take no '@weights'.
DIRECTORY_KINDS = ("hf-clip", "hf-blip-itr", "hf-blip-cap")
# Kinds whose name is a local directory (the tokenizer) and that also need '@weights' (the checkpoint).
DIRECTORY_WEIGHTS_KINDS = ("albef", "tcl")


def _split_spec(text: str) -> tuple[str, str, str]:
    """``"kind:name@weights"`` -> (kind, name, weights), each "" when absent; nothing is checked."""
    head, _, weights = text.strip().partition("@")
    kind, _, name = head.partition(":")
    return kind, name, weights


def model_kind(spec: str | ModelSpec) -> ModelKind:
    """The kind a model spec names (its family, its tasks, its class); loads and reads nothing.

    Config validation asks it before any file is read (paths may live on another machine).
    """
    kind = spec.kind if isinstance(spec, ModelSpec) else _split_spec(spec)[0] if isinstance(spec, str) else None
    if kind not in MODEL_KINDS:
        raise UserError(f"unknown model kind {kind!r} in model spec {str(spec)!r}: use one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def is_captioner_spec(text: str) -> bool:
    """Whether a model spec's kind is trained for captioning (its task), read from :data:`MODEL_KINDS`; loads nothing.

    An unknown kind is not a captioner here; ``parse_model_spec`` refuses it.
    """
    kind = MODEL_KINDS.get(_split_spec(text)[0]) if isinstance(text, str) else None
    return kind is not None and kind.task is Task.CAPTIONING


def parse_model_spec(text: str) -> ModelSpec:
    """Parse and check a model spec string (kind known, name present where needed, weights file exists)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"model spec {text!r} is empty: use one of {', '.join(MODEL_KINDS)} (e.g. tiny-clip)")
    kind, name, weights = _split_spec(text)
    needs_name = model_kind(text).needs_name
    if needs_name and not name:
        if kind in DIRECTORY_WEIGHTS_KINDS:
            raise UserError(f"model spec {text!r} needs a tokenizer directory and a checkpoint: write {kind}:/abs/dir@/abs/checkpoint.pth")
        if kind in DIRECTORY_KINDS:
            raise UserError(f"model spec {text!r} needs a model directory: write {kind}:/abs/path/to/dir")
        raise UserError(f"model spec {text!r} needs an architecture name: write {kind}:NAME@/abs/path/to/weights")
    if not needs_name and name:
        raise UserError(f"model spec {text!r}: kind {kind!r} takes no ':NAME' part")
    if kind in DIRECTORY_WEIGHTS_KINDS and not weights:
        raise UserError(f"model spec {text!r} names no checkpoint: write {kind}:{name}@/abs/checkpoint.pth (ALBEF/TCL weights)")
    if kind in DIRECTORY_KINDS + DIRECTORY_WEIGHTS_KINDS:
        if weights and kind in DIRECTORY_KINDS:
            raise UserError(
                f"model spec {text!r}: {kind} loads its weights from the directory, so it takes no '@weights'; "
                "load a fine-tuned vision checkpoint with trainables.models.robust_checkpoint.load_robust_vision"
            )
        directory = Path(name).expanduser().resolve()
        if not directory.is_dir():
            state = "is not a directory" if directory.exists() else "does not exist"
            raise UserError(f"model directory {directory} in model spec {text!r} {state}: check the path after '{kind}:'")
        name = str(directory)
    if weights:
        weights_path = Path(weights).expanduser().resolve()
        if not weights_path.is_file():
            raise UserError(f"weights file {weights_path} in model spec {text!r} does not exist: check the path after '@'")
        weights = str(weights_path)
    return ModelSpec(kind=kind, name=name or None, weights=weights or None)


def load_model(spec: str | ModelSpec) -> VLPModel:
    """Build the model a spec names, in eval mode with the text side frozen."""
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    return MODEL_KINDS[parsed.kind].loader(parsed).eval()
