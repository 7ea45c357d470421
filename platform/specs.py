"""A sweep's model and data specs, parsed once at the edge and passed to the workers in canonical form.

The driver parses every spec once: relative paths become absolute here (Ray workers
run in other directories), a data spec gets every option spelled out, and the model
is pinned to the exact weights every worker loads (``trainables.models.embedded``).
When ``model`` is searched (``space: model: {choice: [tiny-clip, tiny-albef]}``), every
model of the choice is pinned here, and each trial looks its own up by the spelling it
drew (:meth:`PinnedSpecs.pinned_models`). The workers receive the canonical strings
(:meth:`PinnedSpecs.worker_options`), which parse back to the same values wherever they run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from trainables.data import DataSpec, parse_data_spec
from trainables.attacks import TEXT_ATTACKS
from trainables.attacks.word_candidates import EMBEDDED_MLM, MLM_PREFIX
from trainables.models.embedded import ResolvedModel, base_weights_store, resolve_model


@dataclass(frozen=True)
class PinnedSpecs:
    """The parsed specs of a sweep: its pinned models (as the user wrote them -> pinned) and its two datasets."""

    models: dict[str, ResolvedModel]
    train_data: DataSpec
    eval_data: DataSpec
    word_candidates: str | None = None  # the text attacks' word source as workers load it; None: the trial's own option

    def worker_options(self) -> dict[str, str]:
        """The data options that replace the user's spellings on the workers: canonical spec strings (the model: see below)."""
        options = {"train_data": str(self.train_data), "eval_data": str(self.eval_data)}
        return options if self.word_candidates is None else {**options, "word_candidates": self.word_candidates}

    def pinned_models(self) -> list[dict[str, str]]:
        """``{"name": the model as the user wrote it, "spec": canonical spec, "sha256": its weights}`` per model
        (``PINNED_MODELS_KEY``; a list, not a dict keyed by name: Tune's searchers split config keys at '/')."""
        return [{"name": name, "spec": str(model.spec), "sha256": model.base_weights_sha256} for name, model in self.models.items()]

    def base_weights_param(self) -> str:
        """The sweep's base weights for its parent run: the sha256, or ``name=sha256`` per model when several are searched."""
        if len(self.models) == 1:
            return next(iter(self.models.values())).base_weights_sha256
        return ", ".join(f"{name}={model.base_weights_sha256}" for name, model in self.models.items())


def pin_specs(options: Mapping[str, Any], storage_path: str, searched: Collection[str] = (),
              models: Collection[str] | None = None) -> PinnedSpecs:
    """Parse the model and data specs once; embedded models are pinned under ``storage_path`` (pretrained here if needed).

    Args:
        models: every model a trial may run (a searched ``model``'s choices); default ``options["model"]``.
    """
    store = base_weights_store(storage_path)
    word_candidates = None if "word_candidates" in searched else pin_word_candidates(options, store)
    names = list(models) if models is not None else [options["model"]]
    return PinnedSpecs(models={name: resolve_model(name, store) for name in names}, train_data=parse_data_spec(options["train_data"]),
                       eval_data=parse_data_spec(options["eval_data"]), word_candidates=word_candidates)


def pin_word_candidates(options: Mapping[str, Any], store: Path | None) -> str | None:
    """The embedded MLM as ``mlm:<folder>`` when the per-epoch text attacks use it, else None.

    Like tiny-clip, it is pretrained here in the driver (once per machine, cached) and copied
    under the sweep's storage, so that no worker on any node pretrains its own copy. The
    folder's name carries its content key (config and corpus), so a copy is never stale.
    """
    if options.get("word_candidates") != EMBEDDED_MLM or not TEXT_ATTACKS & set(options.get("eval_attacks", ())):
        return None
    from trainables.models.tiny_mlm import ensure_tiny_mlm  # local: loads transformers' BERT only when needed

    folder = ensure_tiny_mlm()
    if store is not None:
        target = store / folder.name
        if not target.is_dir():
            store.mkdir(parents=True, exist_ok=True)
            partial = store / f"{folder.name}.partial-{os.getpid()}"
            shutil.copytree(folder, partial, dirs_exist_ok=True)
            os.replace(partial, target)
        folder = target
    return f"{MLM_PREFIX}{folder}"

