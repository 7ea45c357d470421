"""Base models resolved once, at the edge, to the exact bytes every worker loads.

An embedded model (``tiny-clip``) has no weights file in its spec: its weights are
pretrained on first use and cached per machine. Copies pretrained on different
machines (different thread counts) differ, so a sweep must not let each node make
its own. :func:`resolve_model` runs on the driver only: it pretrains the embedded
model there if it is not cached, copies the weights to a *content-addressed* file
(``tiny-clip-sha256-<hex>.safetensors``) in a folder every node reads (the sweep's
storage folder) and returns the spec ``tiny-clip@<that file>``. Workers load that
spec: ``read_state_dict`` checks the bytes against the hash in the name, and no
worker ever pretrains. Every other spec is already explicit about its weights; its
sha256 is computed once here so every trial records which bytes it started from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainables.errors import UserError
from trainables.models import DIRECTORY_KINDS, ModelSpec, parse_model_spec
from trainables.models.tiny_albef import TINY_TCL, TinyAlbefConfig, pretrained_weights
from trainables.models.tiny_albef_ve import finetuned_weights as finetuned_ve_weights
from trainables.models.tiny_albef_vg import finetuned_weights as finetuned_vg_weights
from trainables.models.tiny_clip import ensure_pretrained
from trainables.models.weights import CONTENT_ADDRESSED, WEIGHT_SUFFIXES, content_addressed_name, file_sha256

# Kinds whose spec may omit the weights: how to get the machine's cached weights file (pretraining it if needed).
EMBEDDED_WEIGHTS: dict[str, Callable[[], Path]] = {"tiny-clip": ensure_pretrained,
                                                    "tiny-albef": lambda: pretrained_weights(TinyAlbefConfig()),
                                                    "tiny-tcl": lambda: pretrained_weights(TINY_TCL),
                                                    # tiny-albef/tiny-tcl fine-tuned for entailment (trainables.models.tiny_albef_ve)
                                                    "tiny-albef-ve": finetuned_ve_weights,
                                                    "tiny-tcl-ve": lambda: finetuned_ve_weights("tcl"),
                                                    # ... and for grounding (trainables.models.tiny_albef_vg)
                                                    "tiny-albef-vg": finetuned_vg_weights,
                                                    "tiny-tcl-vg": lambda: finetuned_vg_weights("tcl")}
BASE_WEIGHTS_DIR = "base-weights"  # under a sweep's storage folder: the content-addressed base weights


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec whose weights are pinned: the canonical spec workers load and the sha256 of its weights."""

    spec: ModelSpec
    base_weights_sha256: str


def base_weights_store(storage_path: str) -> Path | None:
    """The folder of content-addressed base weights under a sweep's storage (which every node reads), or None for a URI.

    With a URI storage (``s3://``) the file stays in the driver's cache folder: point every node's
    ``MAVA_CACHE_DIR`` at shared storage then, or name the weights file in the spec (``tiny-clip@/shared/w.safetensors``).
    """
    return None if "://" in storage_path else Path(storage_path) / BASE_WEIGHTS_DIR


def resolve_model(spec: str | ModelSpec, store: Path | None = None) -> ResolvedModel:
    """Pin a model spec to its weights; for an embedded model, pretrain (driver only) and write a content-addressed copy.

    Args:
        store: the folder for content-addressed copies (default: beside the cached weights).
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if parsed.kind in EMBEDDED_WEIGHTS and parsed.weights is None:
        source = EMBEDDED_WEIGHTS[parsed.kind]()
        sha256 = file_sha256(source)
        target = (store or source.parent) / content_addressed_name(parsed.kind, sha256)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copy under a temporary name first: a worker never sees half a file under the final name.
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return ResolvedModel(ModelSpec(parsed.kind, parsed.name, str(target)), sha256)
    return ResolvedModel(parsed, base_weights_sha256(parsed))


def base_weights_sha256(spec: ModelSpec) -> str:
    """The sha256 of the weights a parsed spec loads (a directory's: over its weight files, by name); never pretrains.

    A content-addressed file is hashed and checked against its name.

    Raises:
        UserError: an embedded spec without a weights file (resolve it with :func:`resolve_model` first),
            or a content-addressed file whose bytes do not match its name.
    """
    if spec.weights is not None:
        found = file_sha256(Path(spec.weights))
        named = CONTENT_ADDRESSED.search(Path(spec.weights).name)
        if named is not None and named["sha256"] != found:
            raise UserError(f"{spec.weights} does not hash to the sha256 in its name (file {found}): delete it and "
                            "start the run again, which writes it anew")
        return found
    if spec.kind in DIRECTORY_KINDS:
        return _directory_sha256(Path(spec.name))
    raise UserError(f"model spec {str(spec)!r} names no weights file: resolve it at the edge "
                    "(trainables.models.embedded.resolve_model) so every worker loads the same bytes")


def _directory_sha256(directory: Path) -> str:
    # One digest over (name, sha256) of every weights file: renaming, adding or changing one changes it.
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def verify_base_weights(spec: str, expected_sha256: str) -> None:
    """On a worker: the weights ``spec`` loads are the bytes the edge resolved (``expected_sha256``); never pretrains.

    Raises:
        UserError: the file is missing on this node, or holds other bytes.
    """
    parsed = parse_model_spec(spec)
    found = base_weights_sha256(parsed)
    if found != expected_sha256:
        raise UserError(f"the base weights of {spec} on this node hash to {found}, but the sweep resolved {expected_sha256}: "
                        "the file changed after the sweep started, or this node sees another file at that path; "
                        "put storage.path on storage every node shares")
