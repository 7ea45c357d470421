"""What each column group of the paper-style table measures: its threat model and, for recall, its scoring.

Per-epoch evaluation (what a sweep records) always attacks the row's own encoder,
white-box: the fine-tuned one for a defense, the base one for ``none``. Image attacks
perturb pixels only; the multimodal ones (Co-attack, SGA, VLP-attack) also replace
caption words, proposed by the trial's ``word_candidates`` source. Recall depends on
how candidates were ranked (cosine ITC, or ITC top-k re-scored by an ITM head): the
scoring is a property of the row's model, so a recall group names it when every row
shares one and points to the ``scoring`` column when they differ.
"""

from __future__ import annotations

from pathlib import PurePath

from trainables.attacks import TEXT_ATTACKS
from trainables.names import CLEAN, RECALL_KEYS

SCORING_COLUMN = "scoring"


def word_source_label(source: str) -> str:
    """``tiny-mlm``, ``offline``, or ``mlm:<folder name>`` (a folder's full path is this machine's business)."""
    kind, _, path = source.partition(":")
    return f"{kind}:{PurePath(path).name}" if kind == "mlm" and path else source


def group_notes(metric_columns: list[str], word_sources: set[str], scorings: set[str]) -> dict[str, str]:
    """One line per column group (``clean``, ``pgd/eps4`` ...), keyed by the group's prefix."""
    notes: dict[str, str] = {}
    for column in metric_columns:
        prefix, key = column.rsplit("/", 1)
        if prefix not in notes:
            notes[prefix] = _threat(prefix, word_sources)
        if key in RECALL_KEYS and "scoring" not in notes[prefix]:
            scoring = next(iter(scorings)) if len(scorings) == 1 else f"per row (the {SCORING_COLUMN} column)"
            notes[prefix] += f"; scoring: {scoring}"
    return notes


def _threat(prefix: str, word_sources: set[str]) -> str:
    if prefix == CLEAN:
        return "no attack"
    attack, _, eps = prefix.partition("/eps")
    bound = f"image ℓ∞ ≤ {eps}/255"
    if attack not in TEXT_ATTACKS:
        return f"white-box on the row's encoder; {bound}, text untouched"
    sources = ", ".join(sorted(word_source_label(s) for s in word_sources)) or "unrecorded"
    return f"white-box on the row's encoder; {bound} + caption words from {sources}"
