"""The report's adversarial-example section: the pictures each best trial logged (its ``examples/`` artifact).

One block per model × defense × eps group, for the group's best finished trial by the
report's objective (the row the paper-style table shows): its clean and adversarial test
images, the perturbations, and the captions the undefended and the fine-tuned encoder
retrieve, as the trial drew them after its last epoch (``trainables.evaluation.examples``).
Images are embedded as data URIs so that the page stands alone (and written beside it). Reads MLflow only.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dashboards import page
from dashboards.records import ExperimentRecords, Trial, objective_mode
from platform.mlflow_downloads import quiet_downloads
from trainables.evaluation.examples import INDEX_FILE, read_examples
from trainables.evaluation.examples_page import STYLE, examples_fragment
from trainables.names import EXAMPLES_ARTIFACT_DIR


def best_trials(records: ExperimentRecords, objective: str | None) -> list[Trial]:
    """The best finished trial of each model × defense × eps group by ``objective`` (its mode), in group order."""
    sign = -1.0 if objective and objective_mode(records, objective) == "min" else 1.0

    def score(trial: Trial) -> float:
        value = trial.metrics.get(objective) if objective else None
        return float("-inf") if value is None else sign * value

    best: dict[tuple, Trial] = {}
    for trial in records.finished():
        key = (trial.model, trial.defense, trial.eps)
        if key not in best or score(trial) > score(best[key]):
            best[key] = trial
    return [best[key] for key in sorted(best)]


# (file stem, PNG bytes) -> the image's src in the page (a data URI; the report also writes the file beside it).
EmbedPng = Callable[[str, bytes], str]


def trial_examples_html(client: MlflowClient, trial: Trial, embed: EmbedPng) -> str | None:
    """The trial's examples as an HTML fragment, or None when it logged none."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            with quiet_downloads():
                local = Path(client.download_artifacts(trial.run_id, EXAMPLES_ARTIFACT_DIR, folder))
        except (MlflowException, OSError):
            return None  # a trial from before the pictures existed, or one with examples: 0
        if not (local / INDEX_FILE).is_file():
            return None
        _, examples = read_examples(local)
        stem = f"examples-{trial.run_id}-"
        return examples_fragment(examples, lambda name: embed(stem + Path(name).stem, (local / name).read_bytes()))


def examples_section(client: MlflowClient, records: ExperimentRecords, objective: str | None, embed: EmbedPng) -> str:
    blocks = []
    for trial in best_trials(records, objective):
        fragment = trial_examples_html(client, trial, embed)
        if fragment is not None:
            title = f"{trial.model} · {trial.defense} · eps {trial.eps} (trial {trial.trial_id}, run {trial.run_id})"
            blocks.append(page.subheading_html(title) + fragment)
    if not blocks:
        return page.reason_html("no finished trial logged adversarial examples (the training option examples: 0, "
                                "a captioner, or runs recorded before the option existed)")
    return (f"<style>{STYLE}</style>"
            + page.note_html("For each group's best trial: a few fixed test images, attacked white-box on the undefended "
                             "base encoder and on the fine-tuned one, at the largest evaluated eps. The perturbation is "
                             "amplified (grey = unchanged, black/white = ±eps); a tick marks a retrieved caption of the "
                             "image itself; words a multimodal attack replaced are highlighted; for ALBEF/TCL the last "
                             "picture is GradCAM of the ITM logit with the image's first caption. "
                             f"Objective ranking the trials: {html.escape(objective or '(none)')}.")
            + "".join(blocks))
