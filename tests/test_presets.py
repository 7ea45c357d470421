"""Every shipped sweep file validates; paper presets name their missing local files instead of downloading."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from platform.sweep import check_inputs
from platform.sweep_spec import load_sweep_spec
from trainables.errors import UserError
from trainables.models import is_captioner_spec

SWEEP_FILES = sorted((REPO_ROOT / "search_spaces").glob("*.yaml"))
PAPER_PRESETS = [path for path in SWEEP_FILES if path.name.startswith("paper-")]


def test_there_is_a_paper_preset_per_real_model_kind():
    models = {load_sweep_spec(path).experiment.model.split(":")[0] for path in PAPER_PRESETS}
    assert {"open_clip", "hf-clip", "hf-blip-itr", "hf-blip-cap"} <= models


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates(path):
    spec = load_sweep_spec(path)
    assert spec.search.objectives


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.name)
def test_paper_presets_use_the_papers_hyperparameters(path):
    spec = load_sweep_spec(path)
    options = spec.base_training_options()
    if is_captioner_spec(options["model"]):
        # Eq. 8 (App. A.4): no L_CMS for a captioner, so a = 0 and no M; scored on clean captions.
        assert (options["a"], options["b"], options["c"], options["N"]) == (0, 0.4, 0.6, 3) and "M" not in options
        assert spec.objective_metrics() == ["clean/cider"]
    else:
        assert (options["a"], options["b"], options["c"], options["N"], options["M"]) == (0.002, 0.4, 0.6, 3, 5)
    assert options["epochs"] == 10 and options["pgd_steps"] == 10 and options["weight_decay"] == 1e-4
    assert options["lr"] == (1e-4 if "clip" in options["model"] else 1e-3)  # App. A.1: 1e-4 for CLIP, else 1e-3


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.name)
def test_paper_presets_without_local_files_say_which_path_to_set(path, tmp_path):
    weights = tmp_path / "missing-weights"
    spec = load_sweep_spec(path, {"experiment.model": _with_path(load_sweep_spec(path).experiment.model, weights)})
    with pytest.raises(UserError, match=str(weights)):
        check_inputs(spec)


def _with_path(model: str, path) -> str:
    kind, _, rest = model.partition(":")
    if kind == "open_clip":
        return f"open_clip:{rest.split('@')[0]}@{path}.pt"
    return f"{kind}:{path}"
