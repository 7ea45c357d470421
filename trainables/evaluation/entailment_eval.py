"""Visual-entailment accuracy, clean and under each attack × eps, white-box or transfer, as result rows.

The model is an entailment model: ``entailment_logits(pixels, hypotheses) -> (B, 3)`` (ALBEF's VE
head over the fusion ``[CLS]``), with ``encode_image``/``encode_text`` the raw ViT and text
``[CLS]`` (what Co-attack's ``VEEval.py --cls`` attacks). The attacks:

* ``pgd``: image only, 10 sign steps of 1/255 from a random start, maximising the 3-way
  classifier's cross-entropy with the pair's label (the hypothesis is untouched);
* ``co-attack``: the existing Co-attack on the unimodal raw-CLS features, each pair's
  hypothesis its one caption (``run_before_fusion`` as in ``VEEval.py``); the pair is then
  scored with the adversarial image *and* hypothesis;
* ``sga``: SGA with MAVA's caption *sets* (``ve_dataset_SGA``: the hypothesis plus the
  premise image's first 4 captions); only for data that has premise captions
  (``synthetic-ve``), refused otherwise (SNLI-VE ships none). The adversarial hypothesis is
  the set's first member after the attack.

With a surrogate the attacks are crafted on it and only scored on the target (Table 7);
the target then runs under ``no_grad`` only. ``pairs="entailment"`` scores only the
entailment pairs (MAVA's ``ve_dataset.py`` keeps only those); ALBEF's test scores all.
Accuracy is in percent, ALBEF's ``correct / total``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from trainables.attacks.base import AttackOutput, eval_mode, frozen_eval
from trainables.attacks.co_attack import co_attack
from trainables.attacks.pgd import PGDSettings, pgd
from trainables.attacks.sga import sga_attack
from trainables.data.entailment import EntailmentBatch, EntailmentItem, collate_entailment, only_entailment
from trainables.errors import UserError
from trainables.evaluation.entailment import EntailmentScore, entailment_accuracy
from trainables.evaluation.robustness import precision_warnings
from trainables.names import CLEAN, ENTAILMENT_KEYS, eps_fraction, metric_name
from trainables.seeds import EVAL_ATTACK, HONESTY_CHECK, derive_seed

PAIR_SCOPES = ("all", "entailment")  # which pairs are scored: ALBEF's test (all) or MAVA's VE data (entailment only)
SGA_PREMISE_CAPTIONS = 4  # MAVA's ve_dataset_SGA: the hypothesis plus the premise's first 4 captions
ENTAILMENT_ATTACKS = ("pgd", "co-attack", "sga")
TEXT_ATTACKS_VE = frozenset({"co-attack", "sga"})
ACCURACY = ENTAILMENT_KEYS[0]


@dataclass(frozen=True)
class EntailmentSettings:
    """Attacks × eps (pixel units in [0, 1]); batch size; pair cap; seed; which pairs; text attacks' word source
    (a ``trainables.attacks.word_candidates`` spec; None = offline)."""

    attacks: tuple[str, ...] = ("pgd",)
    eps: tuple[float, ...] = (2 / 255, 4 / 255)
    batch_size: int = 64
    max_pairs: int | None = None
    seed: int = 0
    pairs: str = "all"
    text_candidates: str | None = None


@dataclass(frozen=True)
class EntailmentRow:
    """One line of a VE results table: accuracy (percent) and per-class counts of one attack at one eps.

    ``threat``: ``none`` (clean), ``white-box`` or ``transfer:<surrogate spec>``; ``pairs``: ``all`` or
    ``entailment`` (which pairs were scored); ``text_source``: a text attack's word source, else None.
    """

    attack: str
    eps: float | None
    score: EntailmentScore
    threat: str
    pairs: str
    text_source: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float:
        return 100.0 * self.score.accuracy

    def to_json(self) -> dict:
        return {"attack": self.attack, "eps": None if self.eps is None else eps_fraction(self.eps), ACCURACY: self.accuracy,
                "correct": self.score.correct, "total": self.score.total,
                "per_class": {name: dataclasses.asdict(count) for name, count in self.score.per_class.items()},
                "threat": self.threat, "pairs": self.pairs, "text_source": self.text_source, "warnings": list(self.warnings)}


def _classifier_loss(model, hypotheses: list[str], labels: torch.Tensor):
    return lambda pixels: F.cross_entropy(model.entailment_logits(pixels, hypotheses).float(), labels, reduction="none")


def pgd_entailment_attack(model, images: torch.Tensor, hypotheses: list[str], labels: torch.Tensor, eps: float,
                          generator: torch.Generator, steps: int = 10, step_size: float = 1 / 255) -> AttackOutput:
    """Image-only PGD on the 3-way classifier's cross-entropy with the true labels (hypotheses untouched)."""
    with frozen_eval(model):
        adversarial = pgd(_classifier_loss(model, hypotheses, labels.to(images.device)), images,
                          PGDSettings(eps=eps, steps=steps, step_size=step_size), generator)
    return AttackOutput(images=adversarial)


def _caption_sets(dataset, indices: list[int], hypotheses: list[str]) -> list[tuple[str, ...]]:
    """MAVA's SGA caption sets: each hypothesis followed by its premise's first captions."""
    return [(hypothesis,) + tuple(_premise_captions(dataset, index)[:SGA_PREMISE_CAPTIONS])
            for index, hypothesis in zip(indices, hypotheses)]


def _premise_captions(dataset, index: int) -> tuple[str, ...]:
    while isinstance(dataset, Subset):  # map the index down to the dataset that knows the premises
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.premise_captions(index)


def _base(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def has_caption_sets(dataset) -> bool:
    """Whether the pairs' premises have captions (what SGA's caption sets need)."""
    return hasattr(_base(dataset), "premise_captions")


def check_entailment_attacks(attacks: tuple[str, ...], dataset=None) -> None:
    """Refuse attacks that do not apply to entailment (and SGA without caption sets), naming the fix."""
    unknown = [attack for attack in attacks if attack not in ENTAILMENT_ATTACKS]
    if unknown:
        raise UserError(f"attack(s) {', '.join(unknown)} do not apply to visual entailment: use "
                        f"{', '.join(ENTAILMENT_ATTACKS)} (retrieval losses have no entailment counterpart here)")
    if dataset is not None and "sga" in attacks and not has_caption_sets(dataset):
        raise UserError("sga does not apply to this entailment data: SGA needs caption sets (MAVA: the hypothesis plus "
                        "the premise image's captions) and these pairs have no premise captions (SNLI-VE ships none); "
                        "drop sga or evaluate on synthetic-ve")


def run_entailment_attack(name: str, attacker, batch: EntailmentBatch, images: torch.Tensor, eps: float, generator: torch.Generator,
                candidates, dataset, indices: list[int]) -> tuple[torch.Tensor, list[str], str | None]:
    """(adversarial images, hypotheses to score, word source) of one attack on one batch."""
    options = {"candidates": candidates} if candidates is not None else {}
    if name == "pgd":
        return pgd_entailment_attack(attacker, images, batch.hypotheses, batch.labels, eps, generator).images, batch.hypotheses, None
    if name == "co-attack":
        output = co_attack(attacker, images, [(h,) for h in batch.hypotheses], eps, generator, **options)
    else:
        output = sga_attack(attacker, images, _caption_sets(dataset, indices, batch.hypotheses), eps, generator, **options)
    return output.images, [group[0] for group in output.captions], output.text_source


def _scored_pairs(dataset, settings: EntailmentSettings):
    if settings.pairs not in PAIR_SCOPES:
        raise UserError(f"pairs={settings.pairs!r}: score 'all' pairs (ALBEF's test) or only 'entailment' pairs (MAVA's VE data)")
    indices = list(range(len(dataset)))
    if settings.pairs == "entailment":
        indices = list(only_entailment(dataset).indices)
    if settings.max_pairs is not None:
        indices = indices[:settings.max_pairs]
    if not indices:
        raise UserError(f"no {settings.pairs} pairs to score in this entailment data: give a file with such pairs")
    return indices


def threat_label(surrogate) -> str:
    return "white-box" if surrogate is None else f"transfer:{surrogate.spec}"


def _check_feature_widths(attacker, item: EntailmentItem, device: torch.device) -> None:
    """Co-attack and SGA compare image and text features directly: their widths must agree (ALBEF: 768 and 768)."""
    with torch.no_grad():
        image_width = attacker.encode_image(item.image.unsqueeze(0).to(device)).shape[-1]
        text_width = attacker.encode_text([item.hypothesis]).shape[-1]
    if image_width != text_width:
        raise UserError(f"co-attack and sga compare the image and text [CLS] features, but {attacker.spec} has {image_width}-wide "
                        f"image and {text_width}-wide text features: these attacks do not apply to it; use pgd")


def entailment_candidates(settings: EntailmentSettings, attacker, dataset, device: torch.device):
    if not any(attack in TEXT_ATTACKS_VE for attack in settings.attacks):
        return None
    _check_feature_widths(attacker, dataset[0], device)
    from trainables.attacks.word_candidates import OFFLINE, candidate_source  # local: may load transformers

    return candidate_source(settings.text_candidates or OFFLINE, attacker, device)


def evaluate_entailment_rows(model, dataset, settings: EntailmentSettings, surrogate=None, progress: bool = False) -> list[EntailmentRow]:
    """One :class:`EntailmentRow` for clean and for each attack × eps, in that order.

    Model and surrogate run in eval mode, their modes restored after; the target is only run under
    ``no_grad`` when a surrogate crafts the attacks.
    """
    if len(dataset) == 0 or not isinstance(dataset[0], EntailmentItem):
        raise UserError("visual entailment scores (premise image, hypothesis, label) pairs, and this data has none: "
                        "give entailment data (synthetic-ve:test,n=..., or snli-ve:/abs/ve_test.json,images=/abs/flickr30k-images)")
    check_entailment_attacks(settings.attacks, dataset)
    with eval_mode(model), (eval_mode(surrogate) if surrogate is not None else contextlib.nullcontext()):
        return _evaluate_rows(model, dataset, settings, surrogate, progress)


def _evaluate_rows(model, dataset, settings: EntailmentSettings, surrogate, progress: bool) -> list[EntailmentRow]:
    indices = _scored_pairs(dataset, settings)
    loader = DataLoader(Subset(dataset, indices), batch_size=settings.batch_size, shuffle=False, collate_fn=collate_entailment)
    device = model.pixel_mean.device
    attacker = surrogate if surrogate is not None else model
    candidates = entailment_candidates(settings, attacker, dataset, device)
    runs = [(CLEAN, None)] + [(attack, eps) for attack in settings.attacks for eps in settings.eps]
    logits: dict[tuple, list[torch.Tensor]] = {run: [] for run in runs}
    sources: dict[tuple, set[str]] = {run: set() for run in runs}
    labels: list[torch.Tensor] = []
    bar = tqdm(total=len(loader) * len(runs), desc="evaluating entailment", disable=not progress, unit="batch")
    offset = 0
    for batch_index, batch in enumerate(loader):
        images = batch.images.to(device)
        batch_indices = indices[offset:offset + len(batch.hypotheses)]
        offset += len(batch.hypotheses)
        labels.append(batch.labels)
        for run in runs:
            attack, eps = run
            if attack == CLEAN:
                adversarial, hypotheses = images, batch.hypotheses
            else:
                # Seed per (batch, run): each cell of the table is reproducible on its own.
                generator = torch.Generator(device=images.device).manual_seed(derive_seed(settings.seed, EVAL_ATTACK, batch_index, runs.index(run)))
                adversarial, hypotheses, source = run_entailment_attack(attack, attacker, batch, images, eps, generator, candidates,
                                                              dataset, batch_indices)
                if source is not None:
                    sources[run].add(source)
            with torch.no_grad():
                logits[run].append(model.entailment_logits(adversarial, hypotheses).float().cpu())
            bar.update(1)
    bar.close()
    gold = torch.cat(labels)
    threat = threat_label(surrogate)
    return [EntailmentRow(attack=attack, eps=eps, score=entailment_accuracy(torch.cat(logits[(attack, eps)]), gold),
                          threat="none" if attack == CLEAN else threat, pairs=settings.pairs,
                          text_source=", ".join(sorted(sources[(attack, eps)])) or None)
            for attack, eps in runs]


def metrics_from_entailment_rows(rows: list[EntailmentRow]) -> dict[str, float]:
    """``{"clean/acc": .., "pgd/eps2/acc": ..}`` (percent): the names the training loop and tracker use."""
    return {metric_name(row.attack, row.eps, ACCURACY): row.accuracy for row in rows}


def evaluate_entailment_epoch(model, dataset, settings, progress: bool = False) -> dict[str, float]:
    """The training loop's evaluation after an epoch (``trainables.tasks``' evaluator): all pairs, white-box.

    Args:
        settings: a ``trainables.tasks.EpochEval`` (attacks, eps, batch size, seed, word candidates).
    """
    entailment_settings = EntailmentSettings(attacks=tuple(settings.attacks), eps=tuple(settings.eps), batch_size=settings.batch_size,
                                             seed=settings.seed, text_candidates=settings.word_candidates)
    return metrics_from_entailment_rows(evaluate_entailment_rows(model, dataset, entailment_settings, progress=progress))


# ---- honesty checks -----------------------------------------------------------------------

LOSS_TOLERANCE = 0.01  # cross-entropy differences below this are noise


def attach_entailment_warnings(rows: list[EntailmentRow]) -> list[EntailmentRow]:
    """Rows with warnings where they contradict each other: an attack above clean accuracy, or a larger eps
    of the same attack leaving a higher accuracy (both beyond two pairs' worth of noise)."""
    clean = next((row for row in rows if row.attack == CLEAN), None)
    result = []
    for row in rows:
        found: list[str] = []
        if row.attack != CLEAN:
            margin = 200.0 / max(row.score.total, 1)
            where = f"{row.attack} at eps {eps_fraction(row.eps)}"
            if clean is not None and row.accuracy > clean.accuracy + margin:
                found.append(f"{where} leaves accuracy {row.accuracy:.1f} above clean {clean.accuracy:.1f}: "
                             "the attack is broken or the gradients are masked")
            for other in rows:
                if other.attack == row.attack and other.eps is not None and other.eps < row.eps and row.accuracy > other.accuracy + margin:
                    found.append(f"{where} leaves accuracy {row.accuracy:.1f} above {other.accuracy:.1f} at the smaller eps "
                                 f"{eps_fraction(other.eps)}: a larger budget helped the model, a sign of gradient masking")
        result.append(dataclasses.replace(row, warnings=row.warnings + tuple(found)))
    return result


def entailment_honesty_checks(model, dataset, settings: EntailmentSettings, surrogate=None, num_pairs: int = 16) -> list[str]:
    """Cheap checks on the first pairs: fp32 parameters, a deterministic forward, non-zero input gradients
    of the classifier's cross-entropy, and (white-box) 40 PGD steps never ending at a lower loss than 10."""
    warnings: list[str] = []
    count = min(num_pairs, len(dataset))
    if count == 0:
        return warnings
    batch = collate_entailment([dataset[i] for i in range(count)])
    device = model.pixel_mean.device
    images, labels = batch.images.to(device), batch.labels.to(device)
    attacker = surrogate if surrogate is not None else model
    warnings += precision_warnings(model, surrogate)
    with frozen_eval(model), torch.no_grad():
        first, second = model.entailment_logits(images, batch.hypotheses), model.entailment_logits(images, batch.hypotheses)
    if not torch.equal(first, second):
        warnings.append("the evaluated model's forward pass is not deterministic in eval mode: these numbers may overstate robustness")
    with frozen_eval(attacker):
        probe = images.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(_classifier_loss(attacker, batch.hypotheses, labels)(probe).sum(), probe)
    zero = int((gradient.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero:
        warnings.append(f"{zero} of {count} pairs have an all-zero input gradient of the classifier's loss: "
                        "gradient-based attacks cannot move them (masked or vanishing gradients)")
    if surrogate is None and "pgd" in settings.attacks:
        for index, eps in enumerate(settings.eps):
            seed = derive_seed(settings.seed, HONESTY_CHECK, index)
            losses = []
            for steps in (10, 40):
                adversarial = pgd_entailment_attack(model, images, batch.hypotheses, labels, eps,
                                                    torch.Generator(device=device).manual_seed(seed), steps=steps).images
                with torch.no_grad():
                    losses.append(float(_classifier_loss(model, batch.hypotheses, labels)(adversarial).mean()))
            if losses[1] < losses[0] - LOSS_TOLERANCE:
                warnings.append(f"at eps {eps_fraction(eps)} 40 PGD steps reach a lower cross-entropy ({losses[1]:.3f}) than "
                                f"10 steps ({losses[0]:.3f}): more steps help the defence, a sign of gradient masking")
    return warnings
