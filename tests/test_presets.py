"""Every shipped sweep file validates and passes ``--check``; paper presets name their missing local files instead of downloading."""

from __future__ import annotations

import pytest
import ray

import platform.sweep
from conftest import REPO_ROOT
from platform.cli import EXIT_USER_ERROR, run_cli
from platform.preflight import check_inputs
from platform.sweep_spec import load_sweep_spec
from trainables.config import TrainConfig
from trainables.errors import UserError
from trainables.models import is_captioner_spec

SWEEP_FILES = sorted((REPO_ROOT / "search_spaces").glob("*.yaml"))
PAPER_PRESETS = [path for path in SWEEP_FILES if path.name.startswith("paper-")]
EMBEDDED = [path for path in SWEEP_FILES if path not in PAPER_PRESETS]  # run on this machine as shipped


def test_there_is_a_paper_preset_per_real_model_kind():
    models = {load_sweep_spec(path).experiment.model.split(":")[0] for path in PAPER_PRESETS}
    assert {"open_clip", "hf-clip", "hf-blip-itr", "hf-blip-cap", "albef", "tcl"} <= models
    assert {path.name for path in EMBEDDED} >= {"abc.yaml", "baselines-tiny.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates(path):
    spec = load_sweep_spec(path)
    assert spec.search.objectives


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.name)
def test_paper_presets_use_the_papers_hyperparameters(path):
    spec = load_sweep_spec(path)
    config = spec.train_config()
    if is_captioner_spec(config.model):
        # Eq. 8 (App. A.4): no L_CMS for a captioner, so a = 0 (M is unused); scored on clean captions.
        assert (config.a, config.b, config.c, config.N) == (0, 0.4, 0.6, 3)
        assert spec.objective_metrics() == ["clean/cider"]
    else:
        assert (config.a, config.b, config.c, config.N, config.M) == (0.002, 0.4, 0.6, 3, 5)
    assert config.epochs == 10 and config.pgd_steps == 10 and config.weight_decay == 1e-4 and config.optimizer.value == "sgd"
    # App. A.1 (MAVA): 1e-4 for CLIP and for visual grounding, else 1e-3 (retrieval, entailment, captioning).
    assert config.lr == (1e-4 if "clip" in config.model or config.run_task.value == "grounding" else 1e-3)


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


# ---- python -m platform.sweep --check, in this process (a subprocess per file would cost ~10 s of imports) ----


@pytest.fixture()
def nothing_starts(monkeypatch):
    """--check must not start Ray: make any attempt fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("--check started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(platform.sweep, "init_ray", refuse)


def run_check(path, tmp_path, capfd, *extra: str) -> tuple[int, str]:
    argv = ["--space", str(path), "--check", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage-path", str(tmp_path / "ray"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: platform.sweep.main(argv))
    out, err = capfd.readouterr()
    return exit_info.value.code, out + err


@pytest.mark.parametrize("path", EMBEDDED, ids=lambda p: p.name)
def test_check_passes_on_the_embedded_default_files_and_prints_the_plan(path, tmp_path, capfd, nothing_starts):
    code, printed = run_check(path, tmp_path, capfd)
    spec = load_sweep_spec(path)
    assert code == 0, printed
    assert f"trials: {spec.search.num_trials or spec.grid_size()} ({spec.search.algorithm.value}" in printed
    assert "objectives: " + ", ".join(f"{o.metric} ({o.mode.value})" for o in spec.search.objectives) in printed
    assert f"resources per trial: {spec.resources.workers_per_trial} worker(s)" in printed
    config_lines = {line.split()[0] for line in printed.splitlines() if line.startswith("  ")}
    assert config_lines == set(TrainConfig.model_fields)  # the full training config, every field once
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow store created, let alone a record


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=lambda p: p.name)
def test_check_on_a_paper_preset_names_the_local_path_to_set(path, tmp_path, capfd, nothing_starts):
    # As shipped, the presets point at placeholder paths (/data, /models) that this machine does not have.
    code, printed = run_check(path, tmp_path, capfd)
    model = load_sweep_spec(path).experiment.model
    placeholder = model.split("@")[-1] if "@" in model else model.partition(":")[2]
    assert code == EXIT_USER_ERROR, printed
    assert placeholder in printed and "does not exist: check the path" in printed, printed
    assert sum(line.startswith("error: ") for line in printed.splitlines()) == 1 and "Traceback" not in printed
    assert not (tmp_path / "mlflow.db").exists()


def test_check_on_a_paper_preset_with_its_model_replaced_reaches_the_data(tmp_path, capfd, nothing_starts):
    # Model, word source and resources fitted to this machine, the next missing placeholder is the annotation file:
    # --check names each problem in turn, the paths first.
    path = REPO_ROOT / "search_spaces" / "paper-clip-vitb16.yaml"
    code, printed = run_check(path, tmp_path, capfd, "--set", "experiment.model=tiny-clip")
    assert code == EXIT_USER_ERROR and "/models/bert-base-uncased is not a folder" in printed, printed
    offline = ("--set", "experiment.model=tiny-clip", "--set", "experiment.word_candidates=offline")
    code, printed = run_check(path, tmp_path, capfd, *offline)
    assert code == EXIT_USER_ERROR and "a trial needs 3 GPUs" in printed, printed
    code, printed = run_check(path, tmp_path, capfd, *offline, "--set", "resources.gpus_per_worker=0",
                              "--set", "resources.workers_per_trial=1", "--set", "resources.cpus_per_worker=1")
    assert code == EXIT_USER_ERROR and "/data/coco/dataset_coco.json does not exist" in printed, printed
