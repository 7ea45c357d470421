"""One spelling for every metric and parameter name used by the loop, the tracker and the dashboards."""

from __future__ import annotations

RECALL_KEYS = ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10")
# COCO caption metrics (x100) of a captioner's evaluation (trainables.evaluation.captioning).
CAPTION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
# Computed in pure Python, so present in every result (METEOR needs Java, SPICE downloaded jars):
# the keys a sweep may optimise.
ALWAYS_COMPUTED_CAPTION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
LOSS_KEYS = ("loss", "l_cms", "l_vsse", "l_sca", "l_fare", "l_tecoa")
EPOCH = "epoch"
# Param of a trial's run: images per optimiser step, batch_size (per worker) x workers_per_trial (DDP averages them).
EFFECTIVE_BATCH_SIZE = "effective_batch_size"
CLEAN = "clean"


def eps_label(eps: float) -> str:
    """``4/255 -> "eps4"``, ``3.5/255 -> "eps3.5"``: eps in 0-255 units, as the paper writes it."""
    value = round(eps * 255, 3)
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"eps{text}"


def eps_fraction(eps: float) -> str:
    """``4/255 -> "4/255"`` for tables and JSON rows."""
    return f"{eps_label(eps)[3:]}/255"


def metric_name(attack: str, eps: float | None, key: str) -> str:
    """``("clean", None, "tr1") -> "clean/tr1"``, ``("pgd", 4/255, "tr1") -> "pgd/eps4/tr1"``."""
    if attack == CLEAN:
        return f"{CLEAN}/{key}"
    return f"{attack}/{eps_label(eps)}/{key}"


def train_metric(key: str) -> str:
    """Per-epoch training loss terms: ``"train/l_cms"``."""
    return f"train/{key}"
