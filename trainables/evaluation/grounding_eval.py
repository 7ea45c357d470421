"""Weakly supervised visual grounding, clean and under attack: rows, metrics, baselines, the per-epoch evaluator.

Per referring expression (ALBEF's ``Grounding.py:val`` with ``--gradcam_mode itm``):
GradCAM of the ITM match logit over one fusion layer's cross-attention
(``model.itm_cross_attention``; default ALBEF's layer 8 of 12, scaled to the model's
depth), upsampled to the original image, proposals scored by ``sum / area ** 0.5``, a
hit when the best proposal's IoU with the ground truth is >= 0.5
(:mod:`trainables.evaluation.grounding`). Accuracy is in percent, over all expressions
(``acc``) and per split present (``acc_val``, ``acc_testA``, ``acc_testB``).

Attacks (``GROUNDING_ATTACKS``), each on the attacking model (the evaluated model
itself: white-box; or ``surrogate``: transfer, the target only scored):

* ``pgd``: image only, 10 sign steps of 1/255 from a random start in the eps-ball,
  *lowering* the ITM match logit of (image, its true expression). A surrogate without
  an ITM head (CLIP) lowers the cosine of the image and expression embeddings instead.
* ``co-attack``: as ``Co-Attack:GroundingEval.py`` (``--adv 4 --cls``): Co-attack's
  ``run_before_fusion`` on the raw 768-d ViT ``[CLS]`` and text ``[CLS]`` (unimodal,
  before projection: :class:`UnimodalCls`), one-word BERT-Attack on the expression, then
  10 image steps guided by the adversarial expression; grounding then runs on the
  adversarial image *and* the adversarial expression.

GradCAM needs only input/activation gradients (``torch.autograd.grad``): no parameter's
``.grad`` is created or changed, and the models' modes are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from trainables.attacks.base import AttackOutput, eval_mode, frozen_eval
from trainables.attacks.co_attack import co_attack
from trainables.attacks.pgd import PGDSettings, pgd
from trainables.data.grounding import GroundingBatch, GroundingItem, collate_grounding
from trainables.errors import UserError
from trainables.evaluation.gradcam import gradcam_map
from trainables.evaluation.grounding import accuracy_per_split, ground, is_hit
from trainables.evaluation.robustness import precision_warnings
from trainables.names import CLEAN, GROUNDING_KEYS, GROUNDING_SPLIT_KEYS, eps_fraction, metric_name
from trainables.seeds import EVAL_ATTACK, derive_seed

if TYPE_CHECKING:  # tasks.py imports this module
    from trainables.tasks import EpochEval

GROUNDING_ATTACKS = ("pgd", "co-attack")
OVERALL_KEY = GROUNDING_KEYS[0]  # "acc": every expression of the evaluated set


@dataclass(frozen=True)
class GroundingSettings:
    """Attacks (``GROUNDING_ATTACKS``) at eps (pixel units in [0, 1]); items per batch; item cap; seed;
    ``layer``: the fusion layer GradCAM reads (None: the model's ``gradcam_layer``);
    ``text_candidates``: Co-attack's word source (a ``trainables.attacks.word_candidates`` spec; None = offline)."""

    attacks: tuple[str, ...] = ("pgd",)
    eps: tuple[float, ...] = (2 / 255, 4 / 255)
    batch_size: int = 16
    max_items: int | None = None
    seed: int = 0
    layer: int | None = None
    text_candidates: str | None = None

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in GROUNDING_ATTACKS]
        if unknown:
            raise UserError(f"attack(s) {', '.join(unknown)} cannot be evaluated on grounding: use {', '.join(GROUNDING_ATTACKS)}")


@dataclass(frozen=True)
class GroundingRow:
    """One line of a grounding table: accuracy (percent) of one attack at one eps under one threat model.

    ``accuracy``: ``acc`` and ``acc_<split>`` for each split present; ``counts``: (hits, items) under the same keys.
    """

    attack: str
    eps: float | None
    accuracy: dict[str, float]
    counts: dict[str, tuple[int, int]]
    threat: str
    text_source: str | None
    items: int
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"attack": self.attack, "eps": None if self.eps is None else eps_fraction(self.eps), **self.accuracy,
                "hits": {key: list(value) for key, value in self.counts.items()}, "threat": self.threat,
                "text_source": self.text_source, "items": self.items, "warnings": list(self.warnings)}


class UnimodalCls(nn.Module):
    """A view of an ALBEF/TCL model whose features are the raw ViT and text ``[CLS]`` (Co-attack's ``--cls``).

    Co-attack compares the two (a KL between their softmaxes), so they must be equally wide (768 in
    ALBEF/TCL). Where they are not (a tiny model whose ViT and BERT widths differ), and for any
    model without a fusion encoder, the model's own ``encode_image``/``encode_text`` are used
    (the projected ITC features; Co-attack's choice for CLIP); ``name`` says which.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.raw = hasattr(model, "text_encoder") and hasattr(model.vision, "tokens") \
            and model.vision.config.width == model.text_encoder.config.hidden_size
        self.name = "raw-cls" if self.raw else "projected"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_tokens(pixels)[:, 0] if self.raw else self.model.encode_image(pixels)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if not self.raw:
            return self.model.encode_text(texts)
        tokens = self.model.tokenizer(list(texts), device=self.model.pixel_mean.device)
        return self.model.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])[:, 0]


def _has_itm(model) -> bool:
    return "itm" in getattr(model, "heads", frozenset()) or getattr(model, "itm_scoring", None) is not None


def match_scores(model, images: torch.Tensor, expressions: list[str], text_features: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) how well image b matches expression b: the ITM match logit, or the embedding cosine without an ITM head."""
    if _has_itm(model):
        return model.itm_pair_logits(model.image_tokens(images), list(expressions))
    if text_features is None:
        with torch.no_grad():
            text_features = F.normalize(model.encode_text(list(expressions)).float(), dim=-1)
    return (F.normalize(model.encode_image(images).float(), dim=-1) * text_features).sum(dim=-1)


def pgd_itm_attack(model, images: torch.Tensor, expressions: list[str], eps: float, generator: torch.Generator,
                   steps: int = 10, step_size: float = 1 / 255) -> AttackOutput:
    """Image-only PGD lowering the match score of each image with its own expression (see the module docstring)."""
    images = images.detach()
    with frozen_eval(model):
        text_features = None
        if not _has_itm(model):
            with torch.no_grad():
                text_features = F.normalize(model.encode_text(list(expressions)).float(), dim=-1)
        adversarial = pgd(lambda x: -match_scores(model, x, expressions, text_features), images,
                          PGDSettings(eps=eps, steps=steps, step_size=step_size), generator)
    return AttackOutput(images=adversarial)


def co_attack_grounding(model, images: torch.Tensor, expressions: list[str], eps: float, generator: torch.Generator,
                        candidates=None, steps: int = 10) -> AttackOutput:
    """Co-attack on (image, expression) pairs with the raw ``[CLS]`` features (``Co-Attack:GroundingEval.py``)."""
    view = UnimodalCls(model)
    output = co_attack(view, images, [(e,) for e in expressions], eps, generator, steps=steps, candidates=candidates)
    return dataclasses.replace(output, text_source=f"{output.text_source}, {view.name} features")


def run_grounding_attack(attack: str, attacker, images: torch.Tensor, expressions: list[str], eps: float,
                         generator: torch.Generator, candidates=None) -> tuple[torch.Tensor, list[str], str | None]:
    """One attack of ``GROUNDING_ATTACKS`` on (image, expression) pairs: (scored images, scored expressions, text source).

    PGD changes the images only; Co-attack also substitutes a word of each expression, and grounding is
    then scored on both adversarial halves (its text source names the word source and the features).
    """
    if attack == "pgd":
        return pgd_itm_attack(attacker, images, expressions, eps, generator).images.detach(), list(expressions), None
    output = co_attack_grounding(attacker, images, expressions, eps, generator, candidates)
    return output.images.detach(), [group[0] for group in output.captions], output.text_source


def grounding_maps(model, images: torch.Tensor, expressions: list[str], layer: int | None = None) -> torch.Tensor:
    """(B, grid, grid) GradCAM maps of the ITM logit over the model's cross-attention (``model.itm_cross_attention``)."""
    logits, attention, mask = model.itm_cross_attention(images, list(expressions), layer)
    return gradcam_map(logits, attention, mask)


def batch_hits(model, batch: GroundingBatch, images: torch.Tensor, expressions: list[str], layer: int | None) -> list[bool]:
    """Whether each item's best proposal (on the map of ``images`` with ``expressions``) hits its ground-truth box."""
    maps = grounding_maps(model, images, expressions, layer).cpu()
    return [is_hit(box, ground(maps[b], batch.original_sizes[b], batch.proposals[b])) for b, box in enumerate(batch.boxes)]


def accuracy_keys(hits: list[bool], splits: list[str]) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """(accuracy in percent, (hits, items)) under ``acc`` and the ``acc_<split>`` of each known split present."""
    counts = {OVERALL_KEY: (sum(bool(h) for h in hits), len(hits))}
    for split, result in accuracy_per_split(hits, splits).items():
        if split in GROUNDING_SPLIT_KEYS:
            counts[GROUNDING_SPLIT_KEYS[split]] = (result.correct, result.total)
    return {key: 100.0 * correct / total for key, (correct, total) in counts.items()}, counts


def grounding_candidates(settings: GroundingSettings, attacker, device: torch.device):
    """Co-attack's word source over the attacker's raw ``[CLS]`` features (None when no attack substitutes words)."""
    if "co-attack" not in settings.attacks:
        return None
    from trainables.attacks.word_candidates import OFFLINE, candidate_source  # local: may load transformers

    return candidate_source(settings.text_candidates or OFFLINE, UnimodalCls(attacker), device)


def evaluate_grounding_rows(model, dataset, settings: GroundingSettings, surrogate=None, progress: bool = False) -> list[GroundingRow]:
    """One :class:`GroundingRow` for clean and for each attack × eps, in that order; models' modes restored.

    Args:
        model: the evaluated (target) model; needs ``itm_cross_attention`` (an ALBEF/TCL checkpoint with ITM).
        dataset: yields :class:`~trainables.data.grounding.GroundingItem`.
        surrogate: craft the attacks on this model instead (transfer), or None (white-box).
    """
    if not hasattr(model, "itm_cross_attention"):
        raise UserError(f"{getattr(model, 'spec', model)} cannot ground expressions: grounding needs a fusion model with "
                        "an ITM head (albef:/tcl: with a retrieval checkpoint)")
    if len(dataset) and not isinstance(dataset[0], GroundingItem):
        raise UserError(f"grounding needs referring expressions with boxes (synthetic-vg:, refcoco+:), but the evaluation "
                        f"set yields {type(dataset[0]).__name__}: set eval_data to e.g. synthetic-vg:test,n=300")
    with eval_mode(model), (eval_mode(surrogate) if surrogate is not None else contextlib.nullcontext()):
        return _rows(model, dataset, settings, surrogate, progress)


def _rows(model, dataset, settings: GroundingSettings, surrogate, progress: bool) -> list[GroundingRow]:
    if settings.max_items is not None and len(dataset) > settings.max_items:
        dataset = Subset(dataset, range(settings.max_items))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=collate_grounding)
    device = model.pixel_mean.device
    attacker = surrogate if surrogate is not None else model
    candidates = grounding_candidates(settings, attacker, device)
    runs = [(CLEAN, None)] + [(attack, eps) for attack in settings.attacks for eps in settings.eps]
    hits: dict[tuple, list[bool]] = {run: [] for run in runs}
    sources: dict[tuple, set[str]] = {run: set() for run in runs}
    splits: list[str] = []
    bar = tqdm(total=len(loader) * len(runs), desc="evaluating grounding", disable=not progress, unit="batch")
    for batch_index, batch in enumerate(loader):
        images = batch.images.to(device)
        splits.extend(batch.splits)
        for run_index, (attack, eps) in enumerate(runs):
            expressions = list(batch.expressions)
            if attack != CLEAN:
                # Seed per (batch, run) so each cell of the table is reproducible on its own.
                generator = torch.Generator(device=images.device).manual_seed(
                    derive_seed(settings.seed, EVAL_ATTACK, batch_index, run_index))
                scored, expressions, source = run_grounding_attack(attack, attacker, images, expressions, eps, generator, candidates)
                if source is not None:
                    sources[(attack, eps)].add(source)
            else:
                scored = images
            # GradCAM on the target: activation gradients only; the target's weights never get a gradient.
            hits[(attack, eps)].extend(batch_hits(model, batch, scored, expressions, settings.layer))
            bar.update(1)
    bar.close()
    threat = "white-box" if surrogate is None else f"transfer:{surrogate.spec}"
    rows = []
    for attack, eps in runs:
        accuracy, counts = accuracy_keys(hits[(attack, eps)], splits)
        rows.append(GroundingRow(attack, eps, accuracy, counts, "none" if attack == CLEAN else threat,
                                 ", ".join(sorted(sources[(attack, eps)])) or None, len(splits)))
    return rows


def grounding_metrics(rows: list[GroundingRow]) -> dict[str, float]:
    """``{"clean/acc": .., "pgd/eps2/acc_testA": ..}``: the names the training loop and tracker record."""
    return {metric_name(row.attack, row.eps, key): value for row in rows for key, value in row.accuracy.items()}


def attach_grounding_warnings(rows: list[GroundingRow]) -> list[GroundingRow]:
    """Rows with warnings where they contradict each other: an attack above clean, a larger eps above a smaller one.

    The margin is two expressions of the row's count (differences below it are noise).
    """
    clean = next((row for row in rows if row.attack == CLEAN), None)
    out = []
    for row in rows:
        found = []
        margin = 200.0 / max(row.items, 1)
        if row.attack != CLEAN:
            where = f"{row.attack} at eps {eps_fraction(row.eps)}"
            if clean is not None and row.accuracy[OVERALL_KEY] > clean.accuracy[OVERALL_KEY] + margin:
                found.append(f"{where} leaves grounding accuracy {row.accuracy[OVERALL_KEY]:.1f} above clean "
                             f"{clean.accuracy[OVERALL_KEY]:.1f}: the attack is broken or the gradients are masked")
            for other in rows:
                if other.attack == row.attack and other.eps is not None and other.eps < row.eps \
                        and row.accuracy[OVERALL_KEY] > other.accuracy[OVERALL_KEY] + margin:
                    found.append(f"{where} leaves grounding accuracy {row.accuracy[OVERALL_KEY]:.1f} above "
                                 f"{other.accuracy[OVERALL_KEY]:.1f} at the smaller eps {eps_fraction(other.eps)}: "
                                 "a larger budget helped the model, a sign of gradient masking")
        out.append(dataclasses.replace(row, warnings=row.warnings + tuple(found)))
    return out


def grounding_honesty_checks(model, dataset, settings: GroundingSettings, surrogate=None, num_items: int = 8) -> list[str]:
    """Cheap checks on the first items: fp32 parameters, a deterministic forward, non-zero input gradients of the match score."""
    warnings: list[str] = []
    count = min(num_items, len(dataset))
    if count == 0:
        return warnings
    batch = collate_grounding([dataset[i] for i in range(count)])
    images = batch.images.to(model.pixel_mean.device)
    warnings += precision_warnings(model, surrogate)
    with frozen_eval(model):
        first = grounding_maps(model, images, batch.expressions, settings.layer)
        second = grounding_maps(model, images, batch.expressions, settings.layer)
    if not torch.equal(first, second):
        warnings.append("the evaluated model's GradCAM maps differ between two eval-mode passes: a randomised model "
                        "needs an expectation-over-transformation attack; these numbers may overstate robustness")
    attacker = surrogate if surrogate is not None else model
    with frozen_eval(attacker):
        probe = images.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(match_scores(attacker, probe, batch.expressions).sum(), probe)
    zero = int((gradient.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero:
        warnings.append(f"{zero} of {count} images have an all-zero input gradient of the match score: gradient-based "
                        "attacks cannot move them (masked or vanishing gradients)")
    return warnings


@dataclass(frozen=True)
class Baselines:
    """Accuracies (percent) that need no model: a uniformly random proposal (its expectation) and the largest proposal."""

    chance: float
    largest_box: float
    mean_proposals: float
    items: int


def grounding_baselines(dataset, max_items: int | None = None) -> Baselines:
    """Chance = mean over items of (proposals that hit) / proposals (= mean 1 / proposals when only one can hit)."""
    count = len(dataset) if max_items is None else min(max_items, len(dataset))
    chance = largest = proposals = 0.0
    for index in range(count):
        item = dataset[index]
        chance += sum(is_hit(item.box, p) for p in item.proposals) / len(item.proposals)
        largest += is_hit(item.box, max(item.proposals, key=lambda p: p[2] * p[3]))
        proposals += len(item.proposals)
    return Baselines(100.0 * chance / count, 100.0 * largest / count, proposals / count, count)


def evaluate_grounding_epoch(model, dataset, settings: "EpochEval", progress: bool) -> dict[str, float]:
    """The training loop's per-epoch grounding evaluation: clean and each ``eval_attacks`` × ``eval_eps`` (white-box)."""
    eval_settings = GroundingSettings(attacks=settings.attacks, eps=settings.eps, batch_size=settings.batch_size,
                                      seed=settings.seed, text_candidates=settings.word_candidates)
    return grounding_metrics(evaluate_grounding_rows(model, dataset, eval_settings, progress=progress))

