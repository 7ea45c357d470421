"""A sweep's model and data specs, parsed once at the edge and passed to the workers in canonical form.

The driver parses every spec once: relative paths become absolute here (Ray workers
run in other directories), a data spec gets every option spelled out, and the model
is pinned to the exact weights every worker loads (``trainables.models.embedded``).
The workers receive the canonical strings (:meth:`PinnedSpecs.worker_options`), which
parse back to the same values wherever they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from trainables.data import DataSpec, parse_data_spec
from trainables.models.embedded import ResolvedModel, base_weights_store, resolve_model


@dataclass(frozen=True)
class PinnedSpecs:
    """The parsed specs of a sweep: its pinned model and its two datasets."""

    model: ResolvedModel
    train_data: DataSpec
    eval_data: DataSpec

    def worker_options(self) -> dict[str, str]:
        """The training options that replace the user's spellings on the workers: canonical spec strings."""
        return {"model": str(self.model.spec), "train_data": str(self.train_data), "eval_data": str(self.eval_data)}


def pin_specs(options: Mapping[str, Any], storage_path: str) -> PinnedSpecs:
    """Parse ``options``' model and data specs once; an embedded model is pinned under ``storage_path`` (pretrained here if needed)."""
    return PinnedSpecs(model=resolve_model(options["model"], base_weights_store(storage_path)),
                       train_data=parse_data_spec(options["train_data"]), eval_data=parse_data_spec(options["eval_data"]))
