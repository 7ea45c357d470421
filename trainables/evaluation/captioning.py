"""Captioning metrics with pycocoevalcap, clean and under cross-task transfer attacks (paper, Table 8).

Metrics are the COCO caption evaluation's BLEU-1..4, METEOR, ROUGE-L, CIDEr and
SPICE, scaled by 100 as BLIP and the paper report them (CIDEr 133.3, not 1.333).
Captions are tokenised with the Stanford PTB tokenizer that pycocoevalcap ships
(Java), as the COCO evaluation does.

Offline, some metrics cannot run; they are reported as ``None`` with a note, never
a crash:
* SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use;
  without them in ``pycocoevalcap/spice/lib`` it is unavailable (copy the jars there
  to enable it).
* METEOR (and the PTB tokenizer) need Java; without it METEOR is unavailable and a
  simple lower-case word tokenizer stands in for PTB (noted: scores then differ
  slightly from the official ones).

The Table 8 setting: captioning models have no text encoder, so adversarial images
are crafted on a *retrieval* surrogate (the paper: ALBEF) with an attack of
``trainables.attacks`` and then captioned by the target model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from trainables.attacks import get_attack
from trainables.attacks.base import frozen_eval
from trainables.data.items import collate
from trainables.errors import UserError
from trainables.names import CAPTION_KEYS, CLEAN, metric_name
from trainables.seeds import EVAL_ATTACK, derive_seed

_SCALE = 100.0
_JAVA_ERRORS = (OSError, ValueError, subprocess.SubprocessError)

References = dict[Hashable, list[str]]
Hypotheses = dict[Hashable, list[str]]  # exactly one caption per id


# pycocoevalcap is imported where a metric is computed, not with this module: every task imports
# this module, and a training or attack run (a GPU machine without pycocoevalcap too) never scores captions.


def _spice_jars_missing() -> list[str]:
    """The jars SPICE's get_stanford_models() would download into pycocoevalcap/spice/lib."""
    from pycocoevalcap.spice import get_stanford_models as spice_models

    lib = Path(spice_models.SPICEDIR) / spice_models.SPICELIB
    return [name for name in (f"{spice_models.JAR}.jar", f"{spice_models.JAR}-models.jar") if not (lib / name).is_file()]


def _simple_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    # Stand-in for PTB without Java: lower case, words and digits, punctuation dropped.
    return {key: [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())) for text in texts] for key, texts in captions.items()}


def _tokenize(captions: dict[Hashable, list[str]], java: bool, notes: list[str]) -> dict[Hashable, list[str]]:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            return PTBTokenizer().tokenize({key: [{"caption": text} for text in texts] for key, texts in captions.items()})
        except _JAVA_ERRORS as error:
            note = f"PTB tokenizer failed ({type(error).__name__}: {error}); a simple word tokenizer was used"
    else:
        note = "Java not found: a simple word tokenizer stood in for the PTB tokenizer (scores differ slightly from COCO's)"
    if note not in notes:
        notes.append(note)
    return _simple_tokenize(captions)


def _meteor_scores(references: References, runs: dict[Hashable, Hypotheses], notes: list[str]) -> dict[Hashable, float | None]:
    """METEOR of every run from one Java process (it takes ~10 s to start)."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        meteor = Meteor()
    except _JAVA_ERRORS as error:
        notes.append(f"METEOR unavailable: could not start Java ({type(error).__name__}: {error})")
        return {run: None for run in runs}
    scores: dict[Hashable, float | None] = {}
    try:
        for run, hypotheses in runs.items():
            scores[run] = _SCALE * float(meteor.compute_score(references, hypotheses)[0])
    except _JAVA_ERRORS as error:
        notes.append(f"METEOR unavailable: the Java scorer failed ({type(error).__name__}: {error})")
        scores = {run: None for run in runs}
        # compute_score holds pycocoevalcap's lock when it fails; Meteor.__del__ would deadlock on it.
        if meteor.lock.locked():
            meteor.lock.release()
    del meteor  # stops the Java process
    return scores


def _spice_scores(references: References, runs: dict[Hashable, Hypotheses], java: bool, notes: list[str]) -> dict[Hashable, float | None]:
    missing = _spice_jars_missing()
    if not java or missing:
        reason = "Java not found" if not java else f"pycocoevalcap/spice/lib lacks {', '.join(missing)} (a download)"
        notes.append(f"SPICE unavailable offline: {reason}; copy Stanford CoreNLP 3.6.0's jars there to enable it")
        return {run: None for run in runs}
    from pycocoevalcap.spice.spice import Spice

    try:
        return {run: _SCALE * float(Spice().compute_score(references, hypotheses)[0]) for run, hypotheses in runs.items()}
    except _JAVA_ERRORS as error:
        notes.append(f"SPICE unavailable: the Java scorer failed ({type(error).__name__}: {error})")
        return {run: None for run in runs}


def _check_inputs(references: References, hypotheses: Hypotheses) -> None:
    if set(references) != set(hypotheses):
        only_refs, only_hyps = set(references) - set(hypotheses), set(hypotheses) - set(references)
        raise ValueError(f"references and hypotheses cover different ids: only in references {sorted(map(str, only_refs))[:5]}, "
                         f"only in hypotheses {sorted(map(str, only_hyps))[:5]}")
    if not references:
        raise ValueError("no captions to score")
    for key, texts in hypotheses.items():
        if len(texts) != 1:
            raise ValueError(f"id {key!r} has {len(texts)} hypotheses; the COCO metrics score exactly one per image")
    for key, texts in references.items():
        if not texts:
            raise ValueError(f"id {key!r} has no reference captions")


def caption_metrics_for_runs(references: References, runs: dict[Hashable, Hypotheses]) -> dict[Hashable, dict]:
    """:func:`caption_metrics` of several hypothesis sets against the same references (one Java start-up)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    for hypotheses in runs.values():
        _check_inputs(references, hypotheses)
    java = shutil.which("java") is not None
    notes: list[str] = []
    if not java:
        notes.append("METEOR unavailable: Java not found (install a Java runtime to enable it)")
    tokenized_references = _tokenize(references, java, notes)
    tokenized_runs = {run: _tokenize(hypotheses, java, notes) for run, hypotheses in runs.items()}
    meteor = _meteor_scores(tokenized_references, tokenized_runs, notes) if java else {run: None for run in runs}
    spice = _spice_scores(tokenized_references, tokenized_runs, java, notes)
    results = {}
    for run, hypotheses in tokenized_runs.items():
        bleu, _ = Bleu(4).compute_score(tokenized_references, hypotheses, verbose=0)
        rouge, _ = Rouge().compute_score(tokenized_references, hypotheses)
        cider, _ = Cider().compute_score(tokenized_references, hypotheses)
        scores = [_SCALE * float(value) for value in bleu] + [meteor[run], _SCALE * float(rouge), _SCALE * float(cider), spice[run]]
        results[run] = dict(zip(CAPTION_KEYS, scores)) | {"notes": list(notes)}
    return results


def caption_metrics(references: References, hypotheses: Hypotheses) -> dict:
    """COCO caption metrics (x100) of ``{id: [hypothesis]}`` against ``{id: [references]}``.

    Returns:
        ``{"bleu1": ..., "bleu4": ..., "meteor": ..., "rouge_l": ..., "cider": ..., "spice": ...,
        "notes": [...]}``; a metric that cannot run offline is None and a note says why.
    """
    return caption_metrics_for_runs(references, {0: hypotheses})[0]


# ---- evaluating a captioning model -------------------------------------------------------


@dataclass(frozen=True)
class CaptionEvalSettings:
    """Attack eps (pixel units in [0, 1]); batching; decoding (BLIP's COCO captioning evaluation)."""

    eps: tuple[float, ...] = (2 / 255,)  # Table 8 reports eps = 2/255
    batch_size: int = 32
    max_images: int | None = None
    seed: int = 0
    max_length: int = 20  # tokens, prompt included
    min_length: int = 5
    num_beams: int = 3


@dataclass(frozen=True)
class CaptionEvaluation:
    """Metrics named ``clean/cider``, ``pgd/eps2/bleu4``...; notes on unavailable metrics; the threat model."""

    metrics: dict[str, float]
    notes: tuple[str, ...]
    threat_model: str


def evaluate_captioning(caption_model, dataset, attack: str | None = None, surrogate=None,
                        settings: CaptionEvalSettings = CaptionEvalSettings(), progress: bool = False) -> CaptionEvaluation:
    """Caption metrics of ``caption_model`` on ``dataset``, clean and under a transfer attack.

    Args:
        caption_model: has ``generate_captions(pixels, max_length, min_length, num_beams)`` (``hf-blip-cap``).
        dataset: yields ImageCaptionItem; every caption of an image is a reference.
        attack: a name in ``trainables.attacks.ATTACKS``, crafted on ``surrogate`` at each
            ``settings.eps``; None scores clean captions only.
        surrogate: the retrieval model the attack runs on (Table 8: ALBEF); required with ``attack``.
    """
    if attack is not None and surrogate is None:
        raise UserError(
            f"attack {attack!r} needs a surrogate retrieval model: captioning models have no text encoder, so "
            "adversarial images are crafted on a retrieval model (the paper's Table 8 uses ALBEF) and then captioned"
        )
    if attack is None and surrogate is not None:
        raise UserError(f"surrogate {surrogate.spec} was given without an attack: name the attack to craft on it (e.g. pgd)")
    attack_fn = get_attack(attack) if attack is not None else None
    if surrogate is not None and surrogate.image_size != caption_model.image_size:
        raise UserError(
            f"surrogate {surrogate.spec} takes {surrogate.image_size} px images but {caption_model.spec} takes "
            f"{caption_model.image_size} px: pick a surrogate with the captioner's input size"
        )
    if settings.max_images is not None and len(dataset) > settings.max_images:
        dataset = Subset(dataset, range(settings.max_images))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    runs = [(CLEAN, None)] + [(attack, eps) for eps in settings.eps if attack is not None]
    references: References = {}
    hypotheses: dict[tuple, Hypotheses] = {run: {} for run in runs}
    device = caption_model.pixel_mean.device
    bar = tqdm(total=len(loader) * len(runs), desc="evaluating captioning", disable=not progress, unit="batch")
    for batch_index, batch in enumerate(loader):
        references.update({item_id: list(captions) for item_id, captions in zip(batch.item_ids, batch.captions)})
        for run in runs:
            attack_name, eps = run
            images = batch.images
            if attack_name != CLEAN:
                # Seeded per (batch, run), as evaluate_retrieval does, so each cell is reproducible alone.
                surrogate_images = images.to(surrogate.pixel_mean.device)
                generator = torch.Generator(device=surrogate_images.device).manual_seed(
                    derive_seed(settings.seed, EVAL_ATTACK, batch_index, runs.index(run)))
                images = attack_fn(surrogate, surrogate_images, batch.captions, eps, generator).images
            with frozen_eval(caption_model):  # eval mode even mid-training (the loop evaluates after train-mode steps)
                captions = caption_model.generate_captions(images.to(device), max_length=settings.max_length,
                                                           min_length=settings.min_length, num_beams=settings.num_beams)
            hypotheses[run].update({item_id: [caption] for item_id, caption in zip(batch.item_ids, captions)})
            bar.update(1)
    bar.close()
    scores = caption_metrics_for_runs(references, hypotheses)
    metrics = {
        metric_name(attack_name, eps, key): scores[(attack_name, eps)][key]
        for attack_name, eps in runs for key in CAPTION_KEYS
        if scores[(attack_name, eps)][key] is not None
    }
    notes = tuple(dict.fromkeys(note for run in runs for note in scores[run]["notes"]))
    threat_model = CLEAN if surrogate is None else f"transfer:{surrogate.spec}"
    return CaptionEvaluation(metrics=metrics, notes=notes, threat_model=threat_model)
