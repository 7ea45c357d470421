"""One adversarial fine-tuning step per defense: attack (inner max) -> forward -> outer loss.

Each step takes precomputed frozen features (caption features of the batch's
images, ``F_org`` of the clean images): both come from frozen encoders, so the
loop computes them once per dataset instead of once per step (issue 7). The step
returns the loss terms; the caller does backward and the optimiser step. A
captioner has no text encoder: its caption features are None, which MAVA and FARE
accept (MAVA then trains with Eq. 8) and TeCoA cannot (the config refuses it).

What the step does *not* do (issue 7; measured in BENCHMARKS.md against
``benchmarks/naive_mava.py``): no text-encoder or ``F_org`` forward, no
parameter gradients inside the attack (``attack_encoder`` runs the encoder on
detached weights and PGD differentiates with respect to the input only), and one
batched forward/backward over the N neighbours and the clean image.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trainables.attacks.base import eval_mode
from trainables.attacks.pgd import PGDSettings, pgd
from trainables.attacks.pgd2 import pgd2_average
from trainables.config import AblatedTerm, Defense, EmbeddingSpace, InnerNeighbourhood, NeighbourMode, Precision, TrainConfig
from trainables.defenses.fare import fare_loss, fare_outer_loss
from trainables.defenses.mava import mava_inner_loss, mava_outer_loss, sample_neighbours
from trainables.defenses.tecoa import class_text_features, tecoa_loss, tecoa_outer_loss
from trainables.names import gradnorm_key

ROBUSTVLM_SIGN_MOMENTUM = 0.9  # train/pgd_train.py's momentum default, which FARE's training uses

# Maps [0, 1] pixels (B, C, H, W) to features (B, D) through the *trainable* encoder.
Encoder = Callable[[torch.Tensor], torch.Tensor]


def attack_encoder(vision: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], channels_last: bool = False,
                   compile: bool = False) -> Encoder:
    """The encoder an attack differentiates: ``vision`` on *detached* weights, in eval mode.

    An attack needs the gradient with respect to its input only. ``torch.autograd.grad(loss,
    x)`` already skips the weight-gradient kernels in eager mode, but with detached weights
    the forward also records no parameter edges and saves no activations that only weight
    gradients need, and ``torch.compile`` traces an input-gradient-only backward (a
    compiled backward computes every gradient its graph was traced with). Detaching
    instead of toggling ``requires_grad`` leaves a DDP wrapper's parameter hooks alone.

    Eval mode (issue 14, defect 7): the attack is not training, so it must not update
    BatchNorm running statistics (ten extra updates per step, from adversarial images) nor
    sample dropout; each call switches ``vision`` to eval and restores its modes after,
    outside the compiled region (``compile``), so the compiled graph sees one mode only.
    """

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        weights = {name: parameter.detach() for name, parameter in vision.named_parameters()}
        return torch.func.functional_call(vision, weights, (_layout(normalize(pixels), channels_last),)).float()

    compiled = torch.compile(forward) if compile else forward

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with eval_mode(vision):
            return compiled(pixels)

    return encode


def train_encoder(vision: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], channels_last: bool = False) -> Encoder:
    """The encoder of the outer step: ``vision`` (DDP-wrapped under Ray Train) with its parameters' gradients."""

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vision(_layout(normalize(pixels), channels_last)).float()  # losses in fp32, also under bf16 autocast

    return encode


def _layout(pixels: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels


def make_encoders(vision: nn.Module, train_vision: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                  config: TrainConfig) -> tuple[Encoder, Encoder]:
    """(attack encoder, train encoder) as the training loop uses them, compiled when ``config.compile``.

    Args:
        vision: the trainable vision tower; train_vision: the same tower, DDP-wrapped under Ray Train.
    """
    attack = attack_encoder(vision, normalize, config.channels_last, compile=config.compile)
    train = train_encoder(train_vision, normalize, config.channels_last)
    if config.compile:
        train = torch.compile(train)
    return attack, train


def step_precision(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of one training step (attack + outer forward); backward runs outside it."""
    if config.precision is Precision.BF16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pgd_settings(config: TrainConfig) -> PGDSettings:
    return PGDSettings(eps=config.eps, steps=config.pgd_steps, step_size=config.pgd_step_size, random_start=True)


def mava_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor | None,
              original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """MAVA (Eqs. 5-7): PGD on L_inner, then a*L_CMS + b*L_VSSE + c*L_SCA on N neighbours and the clean image.

    The neighbours are ``config.neighbours``: N uniform draws around the last iterate (Eq. 2),
    the last N plain-PGD iterates (``last_iterates``), or the authors' ``pgd_2`` (``authors_pgd2``):
    one view, the pixel mean of its last N+1 iterates.

    A captioner (``caption_features=None``) trains with Eq. 8: PGD on L_VSSE, then
    b*L_VSSE + c*L_SCA (``config.a`` must be 0; TrainConfig and the loop check it).

    Args:
        attack_encode: encoder used by the inner PGD (no DDP wrapper: no gradient sync).
        train_encode: encoder whose parameters receive the outer gradient (DDP-wrapped under Ray Train).
        images: (B, C, H, W) clean; caption_features: (B, M, D) or None (a captioner);
            original_features: (B, D) = F_org(v).
    """
    normalized = config.embedding_space is EmbeddingSpace.NORMALIZED
    weights = mava_weights(config)
    inner_captions = caption_features if weights.inner_cms else None  # None: Eq. 5 without L_CMS

    def inner(x: torch.Tensor) -> torch.Tensor:
        if config.inner_neighbourhood is InnerNeighbourhood.NEIGHBOURS:
            # Eq. 5 as written: the objective over N fresh neighbours of the iterate (N forwards per step).
            views = sample_neighbours(x, weights.N, config.beta * config.eps, generator)
            features = attack_encode(views.flatten(0, 1)).view(x.shape[0], views.shape[1], -1)
        else:
            features = attack_encode(x)  # r = 0, as the authors' code: one forward per step
        return mava_inner_loss(features, original_features, inner_captions, config.cms_form, normalized, config.inner_text_distance)

    settings = dataclasses.replace(pgd_settings(config), random_start=config.mava_random_start)
    if config.neighbours is NeighbourMode.AUTHORS_PGD2:
        # The authors' pgd_2: one view per image, the pixel mean of the last N+1 iterates (TrainConfig refuses a random start).
        neighbours = pgd2_average(inner, images, settings, average=weights.N + 1).unsqueeze(1)
    elif config.neighbours is NeighbourMode.LAST_ITERATES and weights.N > 0:
        _, neighbours = pgd(inner, images, settings, generator, keep_iterates=weights.N)
    else:
        adversarial = pgd(inner, images, settings, generator)
        neighbours = sample_neighbours(adversarial, weights.N, config.beta * config.eps, generator)
    batch, count = neighbours.shape[:2]
    # One batched forward over the N neighbours and the clean image (N+1 views per image).
    views = torch.cat([neighbours.flatten(0, 1), images])
    features = train_encode(views)
    neighbour_features = features[: batch * count].view(batch, count, -1)
    clean_features = features[batch * count:]
    return mava_outer_loss(neighbour_features, clean_features, original_features, caption_features,
                           weights.a, weights.b, weights.c, config.cms_form, normalized, config.sca_half)


def fare_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor | None,
              original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """FARE: PGD maximising ``||F(x') - F_org(x)||^2``, then minimise it at x'. Captions are unused."""
    # RobustVLM's PGD (REFERENCE-NOTES, FARE): 0.9 momentum on the signs unless config.fare_sign_momentum is off.
    settings = dataclasses.replace(pgd_settings(config), sign_momentum=ROBUSTVLM_SIGN_MOMENTUM if config.fare_sign_momentum else 0.0)
    adversarial = pgd(lambda x: fare_loss(attack_encode(x), original_features), images, settings, generator)
    return fare_outer_loss(train_encode(adversarial), original_features)


def tecoa_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor,
               original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator, logit_scale: float = 100.0) -> dict[str, torch.Tensor]:
    """TeCoA: PGD maximising the image->class cross-entropy, then minimise it at x'."""
    classes = class_text_features(caption_features)
    adversarial = pgd(lambda x: tecoa_loss(attack_encode(x), classes, logit_scale), images, pgd_settings(config), generator)
    return tecoa_outer_loss(train_encode(adversarial), classes, logit_scale)


STEPS = {Defense.MAVA: mava_step, Defense.FARE: fare_step, Defense.TECOA: tecoa_step}


@dataclass(frozen=True)
class MavaWeights:
    """What one MAVA step uses: Eq. 6's weights, the neighbour count, and whether L_CMS is in the inner objective."""

    a: float
    b: float
    c: float
    N: int
    inner_cms: bool


def mava_weights(config: TrainConfig) -> MavaWeights:
    """The config's a, b, c, N after its Table 4 ablation (``ablate``), the one place that reads it.

    The paper's Table 4 says only "w/X means a variant with X being removed". Removing a
    strategy removes all of it: ``cms`` drops L_CMS from both the inner attack (Eq. 5 becomes
    L_VSSE) and the outer loss (a = 0); ``sca`` sets c = 0. VSSE is "the expansion of the base
    adversarial fine-tuning loss" (the paper's Sec. 3): removing it keeps the base term, the
    distance at the adversarial point itself, with its weight b, and drops the N neighbours
    (N = 0). Dropping b instead would leave no adversarial term but a*L_CMS at a = 0.002, which
    cannot be the Table 4 row whose robust recall is within a few points of full MAVA.
    """
    ablate = AblatedTerm(config.ablate)
    return MavaWeights(a=0.0 if ablate is AblatedTerm.CMS else config.a, b=config.b,
                       c=0.0 if ablate is AblatedTerm.SCA else config.c,
                       N=0 if ablate is AblatedTerm.VSSE else config.N, inner_cms=ablate is not AblatedTerm.CMS)


def term_weights(config: TrainConfig) -> dict[str, float]:
    """Loss term -> its weight in the step's ``loss`` (Eq. 6's a, b, c for MAVA, after any ablation; FARE and TeCoA have one term)."""
    if config.defense is Defense.MAVA:
        weights = mava_weights(config)
        return {"l_cms": weights.a, "l_vsse": weights.b, "l_sca": weights.c}
    return {"l_fare": 1.0} if config.defense is Defense.FARE else {"l_tecoa": 1.0}


def term_gradient_norms(terms: dict[str, torch.Tensor], config: TrainConfig, parameters: list[torch.Tensor]) -> dict[str, float]:
    """``{"gradnorm_cms": ||grad a*L_CMS||, ...}``: the L2 norm, over all ``parameters``, of each weighted term's gradient.

    Issue 14, defect 4: with raw embeddings L_VSSE and L_SCA grow with the squared
    embedding norm while L_CMS is a bounded cosine, so the loss values alone do not say
    which term drives the update; the gradient each term alone would give does. Called
    on the step's own graph before ``loss.backward()`` (same batch, attack and train
    mode as the update): ``torch.autograd.grad`` returns the gradients without touching
    ``.grad``, and ``retain_graph`` keeps the graph for the update's backward. Costs one
    extra backward per term, so the loop calls it on one batch per epoch. Under DDP the
    gradients are this rank's (``autograd.grad`` does not all-reduce). A term the step did
    not produce (L_CMS of a captioner) is absent.
    """
    trainable = [p for p in parameters if p.requires_grad]
    norms = {}
    for key, weight in term_weights(config).items():
        if key not in terms:
            continue
        gradients = torch.autograd.grad(weight * terms[key], trainable, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in gradients if g is not None]
        norms[gradnorm_key(key)] = torch.stack(squares).sum().sqrt().item() if squares else 0.0
    return norms
