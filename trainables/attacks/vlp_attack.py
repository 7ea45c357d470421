"""VLP-attack (Wang et al. 2025), a best-effort reading: contrastive image + text attack with augmented views.

The public code does not run as released; REFERENCE-NOTES records what it does: an
MI-FGSM-like image attack with input diversity and 7 augmented views per step, a text
attack (Gumbel-softmax over the vocabulary with BERTScore and perplexity constraints),
both tied by an InfoNCE loss against augmented positives and a random negative;
defaults eps 16/255, step 1.6/255, 10 steps. Our reading, on the one model interface:

* **negative**: each image b gets one random other image n(b) of the batch (seeded);
  its clean views and captions are the negatives. (With a batch of one there is no
  negative and the loss reduces to pushing away from the positives.)
* **InfoNCE to maximise** for an anchor a (unit vector), positives P and negatives N,
  with the victim's own temperature ``tau = 1 / logit_scale``::

      L(a) = -log( sum_P exp(a.p / tau) / (sum_P exp(a.p / tau) + sum_N exp(a.n / tau)) )

  Maximising it moves the anchor away from what it should match and towards the negative.
* **text** (first): word substitution (:mod:`~trainables.attacks.text_attack`, 1 word) instead
  of the Gumbel-softmax relaxation (which needs a differentiable text input that the model
  interface does not expose); anchor = the candidate caption, positive = its clean image,
  negative = the image n(b).
* **image** (then): MI-FGSM, ``g <- mu g + grad / mean|grad|``, ``x <- P(x + alpha sign(g))``,
  mu = 1.0, alpha = eps / 10 (the paper's 1.6/255 at 16/255, scaled with the eps passed in),
  10 steps from the clean image; each step averages L over 7 diverse views of x' (DI-FGSM
  resize-and-pad, resize rate 1.1, applied with probability 0.7 per view, plus Gaussian noise
  of std eps/2); positives = 7 diverse views of the clean image (drawn once) and the image's
  adversarial captions; negatives = the same for n(b) (its clean views and clean captions).

Example::

    out = vlp_attack(model, images, captions, eps=4 / 255, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks.base import AttackOutput, frozen_eval
from trainables.attacks.projection import project_linf
from trainables.attacks.text_attack import TextAttackSettings, encode_texts, flatten_captions, regroup, text_attack
from trainables.attacks.text_candidates import CandidateSource, OfflineCandidates


def diverse_view(images: torch.Tensor, generator: torch.Generator, resize_rate: float, probability: float,
                 noise_std: float) -> torch.Tensor:
    """One DI-FGSM view: random resize to [H, rate*H), random pad to rate*H, resize back; plus noise.

    One random size and padding for the whole batch (as DI-FGSM); differentiable in ``images``.
    """
    size = images.shape[-1]
    padded_size = max(int(size * resize_rate), size + 1)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator, device=generator.device).item())

    view = images
    apply = torch.rand((1,), generator=generator, device=generator.device).item() < probability
    if apply:
        resized_size = size + draw(padded_size - size)
        resized = F.interpolate(images, size=(resized_size, resized_size), mode="bilinear", align_corners=False)
        remaining = padded_size - resized_size
        top, left = draw(remaining + 1), draw(remaining + 1)
        padded = F.pad(resized, (left, remaining - left, top, remaining - top), value=0.0)
        view = F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False)
    if noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype).to(images.device)
        view = view + noise_std * noise
    return view


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Per-anchor InfoNCE loss (to maximise), several positives and negatives per anchor.

    Args:
        anchors: (A, D) unit vectors; positives: (K, D) unit vectors of every candidate key.
        positive_mask, negative_mask: (A, K) booleans, which keys are each anchor's positives / negatives.
    Returns:
        (A,) ``-log(sum_P e^{s/tau} / sum_{P and N} e^{s/tau})``; 0-free when an anchor has no negatives
        (then ``-logsumexp_P(s/tau)``, which still pushes away from the positives).
    """
    logits = anchors @ positives.T / temperature  # (A, K)
    minus_inf = torch.full_like(logits, float("-inf"))
    positive_term = torch.logsumexp(torch.where(positive_mask, logits, minus_inf), dim=1)
    all_term = torch.logsumexp(torch.where(positive_mask | negative_mask, logits, minus_inf), dim=1)
    has_negative = negative_mask.any(dim=1)
    return torch.where(has_negative, all_term - positive_term, -positive_term)


def vlp_attack(model, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float, generator: torch.Generator,
               steps: int = 10, step_size: float | None = None, views: int = 7, momentum: float = 1.0,
               resize_rate: float = 1.1, diversity_probability: float = 0.7, candidates: CandidateSource | None = None,
               text_settings: TextAttackSettings = TextAttackSettings()) -> AttackOutput:
    """VLP-attack on a batch (our reading; see the module docstring).

    Args:
        model: the attacked model (white-box) or a surrogate (transfer).
        images: (B, 3, H, W) in [0, 1]; captions[b]: the captions of image b.
        eps: L-inf budget (the MAVA paper evaluates 2/255 and 4/255); step_size: None = eps / 10.
        generator: seeds negatives, views, noise and the offline candidates.
        steps, views, momentum, resize_rate, diversity_probability: MI-FGSM and input-diversity settings.
        candidates: word source; None = :class:`OfflineCandidates` of ``model``.
    """
    images = images.detach()
    batch = len(images)
    device = images.device
    alpha = eps / 10 if step_size is None else step_size
    with frozen_eval(model):
        source = candidates if candidates is not None else OfflineCandidates(model)
        temperature = 1.0 / model.logit_scale
        flat, owner = flatten_captions(captions)
        owner = owner.to(device)
        # a random other image per image (a shift by 1..B-1 is never the image itself)
        shift = torch.randint(1, max(batch, 2), (batch,), generator=generator, device=generator.device).to(device)
        negative = (torch.arange(batch, device=device) + shift) % batch if batch > 1 else None

        with torch.no_grad():
            clean_unit = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, D)

        # --- text: anchor = candidate caption; positive = own clean image; negative = image n(b)
        images_index = torch.arange(batch, device=device)
        text_positive = owner.unsqueeze(1) == images_index.unsqueeze(0)  # (T, B)
        text_negative = (negative[owner].unsqueeze(1) == images_index.unsqueeze(0)) if negative is not None else torch.zeros_like(text_positive)

        def text_objective(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            index = index.to(device)
            return info_nce(F.normalize(features, dim=-1), clean_unit, text_positive[index], text_negative[index], temperature)

        adversarial_texts = text_attack(model, flat, text_objective, source, generator, text_settings)

        # --- image: keys = [clean views (views * B) | adversarial captions (T) | clean captions (T)]
        with torch.no_grad():
            clean_views = torch.cat([diverse_view(images, generator, resize_rate, diversity_probability, eps / 2)
                                     for _ in range(views)])
            view_keys = F.normalize(model.encode_image(clean_views).float(), dim=-1)
            adversarial_caption_keys = F.normalize(encode_texts(model, adversarial_texts, text_settings.batch_size), dim=-1)
            clean_caption_keys = F.normalize(encode_texts(model, flat, text_settings.batch_size), dim=-1)
        keys = torch.cat([view_keys, adversarial_caption_keys, clean_caption_keys])
        key_image = torch.cat([images_index.repeat(views), owner, owner])  # image each key belongs to
        key_is_adversarial_caption = torch.zeros(len(keys), dtype=torch.bool, device=device)
        key_is_adversarial_caption[views * batch: views * batch + len(flat)] = True
        key_is_clean_caption = torch.zeros_like(key_is_adversarial_caption)
        key_is_clean_caption[views * batch + len(flat):] = True
        # positives of image b: its clean views and its adversarial captions; negatives: n(b)'s clean views and clean captions
        positive = (key_image.unsqueeze(0) == images_index.unsqueeze(1)) & ~key_is_clean_caption.unsqueeze(0)
        if negative is not None:
            negative_mask = (key_image.unsqueeze(0) == negative.unsqueeze(1)) & ~key_is_adversarial_caption.unsqueeze(0)
        else:
            negative_mask = torch.zeros_like(positive)

        adversarial = images.clone()
        velocity = torch.zeros_like(images)
        for _ in range(steps):
            adversarial.requires_grad_(True)
            stacked = torch.cat([diverse_view(adversarial, generator, resize_rate, diversity_probability, eps / 2)
                                 for _ in range(views)])
            anchors = F.normalize(model.encode_image(stacked).float(), dim=-1)  # (views * B, D)
            loss = info_nce(anchors, keys, positive.repeat(views, 1), negative_mask.repeat(views, 1), temperature).sum() / views
            (gradient,) = torch.autograd.grad(loss, adversarial)
            with torch.no_grad():
                velocity = momentum * velocity + gradient / gradient.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                adversarial = project_linf(adversarial + alpha * velocity.sign(), images, eps)
        adversarial = adversarial.detach()
    return AttackOutput(images=adversarial, captions=regroup(adversarial_texts, captions), text_source=source.name)
