"""Retrieval recall, clean and under each attack × eps, with stable metric names and honesty checks.

Threat models are never mixed: with no surrogate, attacks are computed on the
evaluated model itself (white-box); with a surrogate, they are computed on the
surrogate and only scored on the target (``transfer:<surrogate spec>``): the target
is only ever run under ``no_grad``.

Before a robust number is trusted (as AutoAttack does), :func:`honesty_checks` runs
cheap sanity checks on a few images and :func:`attach_row_warnings` compares the
rows with each other; ``docs/attacks.md`` explains every warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from trainables.attacks import TEXT_ATTACKS, get_attack
from trainables.attacks.apgd import apgd_retrieval_attack
from trainables.attacks.base import caption_centroids, eval_mode, frozen_eval, retrieval_loss
from trainables.attacks.pgd_retrieval import pgd_retrieval_attack
from trainables.data.items import collate
from trainables.evaluation.rerank import itc_similarity, ranks_from_scores, rerank_similarity, scoring_label
from trainables.evaluation.retrieval import check_not_collapsed, ranks_at_k, recall_from_ranks
from trainables.evaluation.uncertainty import QueryRanks
from trainables.names import CLEAN, RECALL_KEYS, eps_fraction, metric_name
from trainables.seeds import EVAL_ATTACK, HONESTY_CHECK, derive_seed


@dataclass(frozen=True)
class EvalSettings:
    """Which attacks at which eps (pixel units in [0, 1]); batch size; image cap; seed;
    text_candidates: the text attacks' word source, a spec of trainables.attacks.word_candidates
    (``tiny-mlm``, ``mlm:/abs/folder``, ``offline``; None = offline);
    k_test: candidates an ITM head re-scores per image and per caption, for a model that has one
    (``model.itm_scoring``; the papers use 128 on Flickr30k, 256 on COCO)."""

    attacks: tuple[str, ...] = ("pgd",)
    eps: tuple[float, ...] = (2 / 255, 4 / 255)
    batch_size: int = 64
    max_images: int | None = None
    seed: int = 0
    text_candidates: str | None = None
    k_test: int = 128


@dataclass(frozen=True)
class RetrievalRow:
    """One line of a results table: recall (percent) of one attack at one eps under one threat model.

    Attributes:
        attack: attack name, or ``clean``; eps: pixel units, None for clean.
        recalls: ``tr1 .. ir10`` in percent.
        threat: ``white-box``, ``transfer:<surrogate spec>``, or ``none`` for the clean row.
        text_source: where a text attack's words came from (None: texts untouched).
        images, captions: how many were scored (the recall's denominators).
        warnings: honesty-check warnings that concern this row.
        scoring: ``itc`` (cosine) or the ITM re-ranking that scored it, e.g. ``itc+itm@128``.
        ranks: every image's and caption's rank (``trainables.evaluation.uncertainty``: what a
            bootstrap over test images resamples); not in :meth:`to_json`, written apart as Parquet.
    """

    attack: str
    eps: float | None
    recalls: dict[str, float]
    threat: str
    text_source: str | None
    images: int
    captions: int
    warnings: tuple[str, ...] = ()
    scoring: str = "itc"
    ranks: QueryRanks | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"attack": self.attack, "eps": None if self.eps is None else eps_fraction(self.eps),
                **{key: self.recalls[key] for key in RECALL_KEYS}, "threat": self.threat,
                "text_source": self.text_source, "images": self.images, "captions": self.captions,
                "warnings": list(self.warnings), "scoring": self.scoring}


def threat_label(surrogate) -> str:
    return "white-box" if surrogate is None else f"transfer:{surrogate.spec}"


def _embed_texts(model, captions: list[str], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_text(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)])


def _text_candidates(settings: EvalSettings, attacker, device: torch.device):
    """The word source shared by every text attack of the run, or None (no text attack: nothing to load)."""
    if not any(attack in TEXT_ATTACKS for attack in settings.attacks):
        return None
    from trainables.attacks.word_candidates import OFFLINE, candidate_source  # local: may load transformers

    return candidate_source(settings.text_candidates or OFFLINE, attacker, device)


def evaluate_retrieval_rows(model, dataset, settings: EvalSettings, surrogate=None, progress: bool = False) -> list[RetrievalRow]:
    """One :class:`RetrievalRow` for clean and for each attack × eps, in that order.

    The model (and surrogate) run in eval mode throughout, their modes restored after: the
    training loop evaluates between train-mode steps, and BatchNorm statistics or dropout
    must neither change nor randomise what is scored.

    Args:
        model: the evaluated (target) model.
        dataset: yields ImageCaptionItem (all captions of each image are used).
        surrogate: craft attacks on this model instead (transfer setting), or None (white-box).
    """
    with eval_mode(model), (eval_mode(surrogate) if surrogate is not None else contextlib.nullcontext()):
        return _evaluate_retrieval_rows(model, dataset, settings, surrogate, progress)


def _evaluate_retrieval_rows(model, dataset, settings: EvalSettings, surrogate, progress: bool) -> list[RetrievalRow]:
    if settings.max_images is not None and len(dataset) > settings.max_images:
        dataset = Subset(dataset, range(settings.max_images))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)
    device = model.pixel_mean.device
    attacker = surrogate if surrogate is not None else model
    candidates = _text_candidates(settings, attacker, device)
    runs = [(CLEAN, None)] + [(attack, eps) for attack in settings.attacks for eps in settings.eps]
    image_features: dict[tuple, list[torch.Tensor]] = {run: [] for run in runs}
    # ITM re-ranking reads the (adversarial) images again, so they are kept, on the CPU, only then.
    kept_images: dict[tuple, list[torch.Tensor]] = {run: [] for run in runs}
    captions_by_run: dict[tuple, list[str]] = {run: [] for run in runs}
    text_sources: dict[tuple, set[str]] = {run: set() for run in runs}
    text_to_image: list[int] = []
    bar = tqdm(total=len(loader) * len(runs), desc="evaluating retrieval", disable=not progress, unit="batch")
    image_offset = 0
    for batch_index, batch in enumerate(loader):
        images = batch.images.to(device)
        for caption_group_index, group in enumerate(batch.captions):
            text_to_image.extend([image_offset + caption_group_index] * len(group))
        image_offset += len(batch.captions)
        for run in runs:
            attack_name, eps = run
            bar.set_postfix_str(attack_name if eps is None else f"{attack_name} {eps_fraction(eps)}")
            if attack_name == CLEAN:
                adversarial_images, adversarial_captions = images, batch.captions
            else:
                # Seed per (batch, run) so each cell of the table is reproducible on its own.
                generator = torch.Generator(device=images.device).manual_seed(derive_seed(settings.seed, EVAL_ATTACK, batch_index, runs.index(run)))
                options = {"candidates": candidates} if candidates is not None and attack_name in TEXT_ATTACKS else {}
                output = get_attack(attack_name)(attacker, images, batch.captions, eps, generator, **options)
                adversarial_images = output.images
                adversarial_captions = output.captions if output.captions is not None else batch.captions
                if output.text_source is not None:
                    text_sources[run].add(output.text_source)
            # The target is only ever scored, never differentiated (transfer uses the surrogate's gradients only).
            with torch.no_grad():
                image_features[run].append(model.encode_image(adversarial_images).float().cpu())
            if model.itm_scoring is not None:
                kept_images[run].append(adversarial_images.detach().cpu())
            captions_by_run[run].extend(caption for group in adversarial_captions for caption in group)
            bar.update(1)
    bar.close()
    text_to_image_tensor = torch.tensor(text_to_image)
    clean_text_features = _embed_texts(model, captions_by_run[(CLEAN, None)], settings.batch_size).float().cpu()
    threat = threat_label(surrogate)
    scoring = scoring_label(model, settings.k_test)
    # A collapsed encoder has no meaningful recall (only tie-breaking): refuse it with the reason, so a
    # training trial fails instead of reporting a number (NaN features are refused by ranks_at_k).
    check_not_collapsed(torch.cat(image_features[(CLEAN, None)]), f"clean image features of {model.spec}")
    rows = []
    for run in runs:
        attack_name, eps = run
        same_texts = captions_by_run[run] == captions_by_run[(CLEAN, None)]
        text_features = clean_text_features if same_texts else _embed_texts(model, captions_by_run[run], settings.batch_size).float().cpu()
        features = torch.cat(image_features[run])
        image_ranks, caption_ranks = ranks_at_k(features, text_features, text_to_image_tensor)
        if model.itm_scoring is not None:  # the model's own retrieval scoring: ITC top-k_test re-scored by ITM
            reranked = rerank_similarity(model, torch.cat(kept_images[run]), captions_by_run[run],
                                         itc_similarity(features, text_features), settings.k_test, rule=model.itm_scoring)
            image_ranks, caption_ranks = ranks_from_scores(reranked, text_to_image_tensor)
        ranks = QueryRanks(attack_name, eps, image_ranks.numpy(), caption_ranks.numpy(), text_to_image_tensor.numpy())
        rows.append(RetrievalRow(attack=attack_name, eps=eps, recalls=recall_from_ranks(image_ranks, caption_ranks),
                                 threat="none" if attack_name == CLEAN else threat,
                                 text_source=", ".join(sorted(text_sources[run])) or None,
                                 images=image_offset, captions=len(text_to_image), scoring=scoring, ranks=ranks))
    return rows


def metrics_from_rows(rows: list[RetrievalRow]) -> dict[str, float]:
    """``{"clean/tr1": .., "pgd/eps4/ir5": ..}``: the metric names the training loop and tracker use."""
    return {metric_name(row.attack, row.eps, key): value for row in rows for key, value in row.recalls.items()}


def evaluate_retrieval(model, dataset, settings: EvalSettings, surrogate=None, progress: bool = False) -> dict[str, float]:
    """Recall metrics named ``clean/tr1``, ``pgd/eps4/ir5``, ... for the model on the dataset.

    Args:
        model: the evaluated (target) model.
        dataset: yields ImageCaptionItem (all captions of each image are used).
        surrogate: craft attacks on this model instead (transfer setting), or None (white-box).
    """
    return metrics_from_rows(evaluate_retrieval_rows(model, dataset, settings, surrogate=surrogate, progress=progress))


# ---- honesty checks -----------------------------------------------------------------------

# Retrieval-loss units (1 - cosine): differences below this are noise.
LOSS_TOLERANCE = 0.01


def _margin(count: int) -> float:
    """Recall differences (percent) within two items of ``count`` are noise."""
    return 200.0 / max(count, 1)


def attach_row_warnings(rows: list[RetrievalRow]) -> list[RetrievalRow]:
    """Rows with warnings when they contradict each other (free: no model call).

    * an attack that *raises* TR@1 or IR@1 above clean;
    * a larger eps that leaves higher recall than a smaller one, same attack.

    "A weaker attack beats a stronger one" is checked on the loss both maximise, in
    :func:`honesty_checks`: recall is not that loss (``1 - mean cosine`` ignores the ranking
    against other captions), so APGD may reach a higher loss yet leave a slightly higher
    TR@1 than PGD on an honest model.
    """
    clean = next((row for row in rows if row.attack == CLEAN), None)
    found: dict[int, list[str]] = {index: [] for index in range(len(rows))}
    for index, row in enumerate(rows):
        if row.attack == CLEAN:
            continue
        where = f"{row.attack} at eps {eps_fraction(row.eps)}"
        for key, margin in (("tr1", _margin(row.images)), ("ir1", _margin(row.captions))):
            if clean is not None and row.recalls[key] > clean.recalls[key] + margin:
                found[index].append(f"{where} leaves {key.upper()} {row.recalls[key]:.1f} above clean {clean.recalls[key]:.1f}: "
                                    "the attack is broken or the gradients are masked")
            for other in rows:
                if other.attack == row.attack and other.eps is not None and other.eps < row.eps \
                        and row.recalls[key] > other.recalls[key] + margin:
                    found[index].append(f"{where} leaves {key.upper()} {row.recalls[key]:.1f} above "
                                        f"{other.recalls[key]:.1f} at the smaller eps {eps_fraction(other.eps)}: "
                                        "a larger budget helped the model, a sign of gradient masking")
    return [dataclasses.replace(row, warnings=row.warnings + tuple(found[index])) for index, row in enumerate(rows)]


def precision_warnings(model, surrogate=None) -> list[str]:
    """One warning per model (evaluated, surrogate) whose floating-point parameters are not all float32."""
    warnings = []
    for role, checked in (("evaluated model", model), ("surrogate", surrogate)):
        if checked is None:
            continue
        dtypes = sorted({str(p.dtype) for p in checked.parameters() if p.is_floating_point()} - {"torch.float32"})
        if dtypes:
            warnings.append(f"the {role} has {', '.join(dtypes)} parameters: attack and evaluate in float32 "
                            "(low precision rounds small gradients to zero)")
    return warnings


def honesty_checks(model, dataset, settings: EvalSettings, surrogate=None, num_images: int = 16) -> list[str]:
    """Cheap AutoAttack-style sanity checks on the first ``num_images`` images; returns warnings.

    * fp32: every floating parameter of the evaluated model (and surrogate) is float32;
    * deterministic forward: two eval-mode forwards of the same images agree exactly;
    * non-zero input gradients of the retrieval loss on the attacking model, per image;
    * per eps, white-box: 40 PGD steps must not leave a lower loss than 10 ("more steps help
      the defence"), and when APGD is evaluated, its loss must not fall below PGD's ("a weaker
      attack beats a stronger one"); transfer: the surrogate's PGD must not beat a white-box
      PGD on the target (this check, and only it, differentiates the target).
    """
    warnings: list[str] = []
    count = min(num_images, len(dataset))
    if count == 0:
        return warnings
    items = [dataset[i] for i in range(count)]
    device = model.pixel_mean.device
    images = torch.stack([item.image for item in items]).to(device)
    captions = [item.captions for item in items]
    attacker = surrogate if surrogate is not None else model
    warnings += precision_warnings(model, surrogate)
    with frozen_eval(model), torch.no_grad():
        first, second = model.encode_image(images), model.encode_image(images)
    if not torch.equal(first, second):
        warnings.append("the evaluated model's forward pass is not deterministic in eval mode: a randomised defence "
                        "needs an expectation-over-transformation attack; these numbers may overstate robustness")
    with frozen_eval(attacker):
        centroids = caption_centroids(attacker, captions)
        probe = images.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(retrieval_loss(attacker.encode_image(probe), centroids).sum(), probe)
    zero = int((gradient.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero:
        warnings.append(f"{zero} of {count} images have an all-zero input gradient of the retrieval loss: gradient-based "
                        "attacks cannot move them (masked or vanishing gradients); try a transfer or black-box attack")

    def target_loss(adversarial: torch.Tensor) -> float:
        with torch.no_grad():
            return float(retrieval_loss(model.encode_image(adversarial), caption_centroids(model, captions)).mean())

    for index, eps in enumerate(settings.eps):
        generator_seed = derive_seed(settings.seed, HONESTY_CHECK, index)
        short = pgd_retrieval_attack(attacker, images, captions, eps, torch.Generator(device=device).manual_seed(generator_seed), steps=10)
        if surrogate is None:
            long = pgd_retrieval_attack(model, images, captions, eps, torch.Generator(device=device).manual_seed(generator_seed), steps=40)
            short_loss, long_loss = target_loss(short.images), target_loss(long.images)
            if long_loss < short_loss - LOSS_TOLERANCE:
                warnings.append(f"at eps {eps_fraction(eps)} 40 PGD steps reach a lower retrieval loss ({long_loss:.3f}) than "
                                f"10 steps ({short_loss:.3f}): more steps help the defence, a sign of gradient masking")
            if "apgd" in settings.attacks:
                strong = apgd_retrieval_attack(model, images, captions, eps, torch.Generator(device=device).manual_seed(generator_seed))
                strong_loss = target_loss(strong.images)
                if strong_loss < short_loss - LOSS_TOLERANCE:
                    warnings.append(f"at eps {eps_fraction(eps)} the weaker PGD (10 steps) reaches a higher retrieval loss "
                                    f"({short_loss:.3f}) than APGD (100 steps, best point; {strong_loss:.3f}): "
                                    "a sign of gradient masking")
        else:
            white_box = pgd_retrieval_attack(model, images, captions, eps, torch.Generator(device=device).manual_seed(generator_seed), steps=10)
            transfer_loss, white_box_loss = target_loss(short.images), target_loss(white_box.images)
            if transfer_loss > white_box_loss + LOSS_TOLERANCE:
                warnings.append(f"at eps {eps_fraction(eps)} PGD transferred from {surrogate.spec} reaches a higher retrieval "
                                f"loss ({transfer_loss:.3f}) than white-box PGD on the model itself ({white_box_loss:.3f}): "
                                "the model's own gradients are masked; its white-box numbers overstate robustness")
    return warnings
