"""Adversarial examples a researcher can look at: a few fixed test images, attacked, and what they retrieve.

For each of the first ``count`` images of the evaluation set and each attack × eps asked
(a trial: every eval attack at its largest eval eps), and for each encoder given (the undefended base and the fine-tuned one), an
:class:`Example` holds the clean image, the adversarial image, and the top captions the
encoder retrieves for the image before and after the attack, out of the captions of a
fixed gallery of test images. Multimodal attacks (SGA, Co-attack, VLP-attack) also
change the image's own captions; those are kept with the words that changed.

Each encoder is attacked white-box with the evaluation's own attack code and settings
(its own seed stream: the pictures' three images are not an evaluation batch), so an
example shows the kind of input the robust metric scores. For a model with an ITM head
(ALBEF, TCL, BLIP's retrieval model) each image also gets its GradCAM map (the paper's
Figure 5): ALBEF's GradCAM of the ITM logit of the image with its first caption, as the
attack left it, over the image. :func:`write_examples`
stores PNGs and a JSON index that :mod:`trainables.evaluation.examples_page` turns into
a page (an MLflow artifact of every trial, and a section of the sweep report).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainables.attacks import TEXT_ATTACKS, get_attack
from trainables.attacks.base import eval_mode
from trainables.evaluation.gradcam import gradcam_map, heat_overlay
from trainables.names import CLEAN, EXAMPLES_ARTIFACT_DIR, eps_fraction
from trainables.seeds import EXAMPLES, derive_seed

INDEX_FILE = "examples.json"
PAGE_FILE = "index.html"
EXAMPLES_DIR = EXAMPLES_ARTIFACT_DIR  # inside the last epoch's checkpoint folder, uploaded as the trial's artifact of that name
TOP_CAPTIONS = 3
GALLERY_IMAGES = 100  # captions of this many test images are the retrieval gallery (the first one's included)


@dataclass(frozen=True)
class Example:
    """One test image under one attack × eps, on one encoder.

    Attributes:
        encoder: ``undefended`` or ``fine-tuned``; image: index in the evaluation set.
        attack, eps: the attack (``clean`` for the unattacked row) and its eps as ``x/255``.
        top: the encoder's top captions for the (adversarial) image, best first, each with
            whether it is one of the image's own captions.
        captions: the image's own captions as the attack left them (the clean ones for image-only attacks).
        changed: per caption, the indices of the words the attack replaced.
        linf: ``||x_adv - x||_inf`` in /255 units (at most eps: the attacks' contract).
        png, delta_png: file names of the image and of the amplified perturbation (None for clean).
        cam_png: file name of the GradCAM map over the image (None for a model without ITM cross-attention).
    """

    encoder: str
    image: int
    attack: str
    eps: str | None
    top: list[tuple[str, bool]]
    captions: list[str]
    changed: list[list[int]]
    linf: float
    png: str
    delta_png: str | None
    cam_png: str | None = None


def changed_words(original: str, adversarial: str) -> list[int]:
    """Indices of the words a substitution changed (the attacks replace words, never split or join them)."""
    before, after = original.split(), adversarial.split()
    if len(before) != len(after):
        return list(range(len(after)))  # not a word-for-word substitution: mark every word
    return [i for i, (a, b) in enumerate(zip(before, after)) if a != b]


def amplified(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Map a perturbation in [-eps, eps] to [0, 1] (grey = unchanged) so that it is visible."""
    return (0.5 + delta / (2 * eps)).clamp(0, 1)


def _png(pixels: torch.Tensor, path: Path) -> None:
    array = (pixels.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def has_gradcam(model) -> bool:
    """Whether the model can draw GradCAM of its ITM logit (an ALBEF/TCL retrieval checkpoint, BLIP's retrieval model)."""
    return hasattr(model, "itm_cross_attention") and "itm" in getattr(model, "heads", ())


def gradcam_pictures(model, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(B, 3, H, W): each image with the GradCAM map of its ITM logit with ``texts[b]`` drawn over it."""
    logits, attention, mask = model.itm_cross_attention(images, list(texts))
    return heat_overlay(images, gradcam_map(logits, attention, mask, image_size=tuple(images.shape[-2:])))


def _embed_texts(model, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(torch.cat([model.encode_text(captions[i:i + batch_size]).float()
                                      for i in range(0, len(captions), batch_size)]), dim=-1)


def _gallery_items(dataset, count: int) -> list:
    return [dataset[i] for i in range(min(len(dataset), max(count, GALLERY_IMAGES)))]


def gallery_features_of(model, dataset, count: int) -> torch.Tensor:
    """The normalised text features of the caption gallery :func:`encoder_examples` ranks (``count`` as there)."""
    with eval_mode(model):
        return _embed_texts(model, [caption for item in _gallery_items(dataset, count) for caption in item.captions])


def encoder_examples(model, encoder: str, dataset, attacks: tuple[str, ...], eps: tuple[float, ...], count: int,
                     seed: int, candidates=None, gallery_features: torch.Tensor | None = None) -> tuple[list[Example], dict[str, torch.Tensor]]:
    """The examples of one encoder, and the images they show keyed by file name (written by :func:`write_examples`).

    ``gallery_features``: the gallery's text features when the caller has them (:func:`gallery_features_of`; models
    that share a frozen text tower share them); computed here otherwise.
    """
    device = model.pixel_mean.device
    items = _gallery_items(dataset, count)
    gallery = [caption for item in items for caption in item.captions]
    owner = [index for index, item in enumerate(items) for _ in item.captions]
    shown = items[:count]
    images = torch.stack([item.image for item in shown]).to(device)
    captions = [list(item.captions) for item in shown]
    examples, pictures = [], {}
    with eval_mode(model):
        if gallery_features is None:
            gallery_features = _embed_texts(model, gallery)
        runs = [(CLEAN, None)] + [(attack, e) for attack in attacks for e in eps]
        for run_index, (attack, e) in enumerate(runs):
            if attack == CLEAN:
                adversarial, adversarial_captions = images, captions
            else:
                generator = torch.Generator(device=device).manual_seed(derive_seed(seed, EXAMPLES, run_index))
                options = {"candidates": candidates} if candidates is not None and attack in TEXT_ATTACKS else {}
                output = get_attack(attack)(model, images, captions, e, generator, **options)
                adversarial = output.images
                adversarial_captions = output.captions if output.captions is not None else captions
            with torch.no_grad():
                image_features = F.normalize(model.encode_image(adversarial).float(), dim=-1)
            order = (image_features @ gallery_features.T).argsort(dim=1, descending=True)[:, :TOP_CAPTIONS]
            cams = gradcam_pictures(model, adversarial, [group[0] for group in adversarial_captions]) if has_gradcam(model) else None
            label = attack if e is None else f"{attack}-eps{eps_fraction(e).split('/')[0]}"
            for i in range(len(shown)):
                png = f"{encoder}-{label}-{i}.png"
                pictures[png] = adversarial[i]
                delta_png = None
                if e is not None:
                    delta_png = f"{encoder}-{label}-{i}-delta.png"
                    pictures[delta_png] = amplified(adversarial[i] - images[i], e)
                cam_png = None
                if cams is not None:
                    cam_png = f"{encoder}-{label}-{i}-cam.png"
                    pictures[cam_png] = cams[i]
                examples.append(Example(
                    encoder=encoder, image=i, attack=attack, eps=None if e is None else eps_fraction(e),
                    top=[(gallery[j], owner[j] == i) for j in order[i].tolist()],
                    captions=list(adversarial_captions[i]),
                    changed=[changed_words(a, b) for a, b in zip(captions[i], adversarial_captions[i])],
                    linf=round(float((adversarial[i] - images[i]).abs().max()) * 255, 4), png=png, delta_png=delta_png,
                    cam_png=cam_png))
    return examples, pictures


def write_examples(directory: Path, examples: list[Example], pictures: dict[str, torch.Tensor], context: dict) -> Path:
    """PNGs and ``examples.json`` (``context``: model, defense, eps, ... shown above the examples) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, pixels in pictures.items():
        _png(pixels, directory / name)
    index = directory / INDEX_FILE
    index.write_text(json.dumps({"context": context, "rows": [asdict(example) for example in examples]}, indent=1))
    return index


def read_examples(directory: Path) -> tuple[dict, list[Example]]:
    data = json.loads((directory / INDEX_FILE).read_text())
    return data["context"], [Example(**{**row, "top": [tuple(pair) for pair in row["top"]]}) for row in data["rows"]]


def _without_paths(spec: str) -> str:
    """``open_clip:ViT-B-16@/abs/w.pt`` -> ``open_clip:ViT-B-16``; ``albef:/abs/dir@/abs/f.pth`` -> ``albef``."""
    kind, _, name = spec.partition("@")[0].partition(":")
    return f"{kind}:{name}" if name and "/" not in name else kind


def write_trial_examples(model, dataset, config, directory: Path) -> Path:
    """A trial's examples after its last epoch: the base model (reloaded from ``config.model``) and ``model``
    side by side, attacked by each eval attack at the largest eval eps; PNGs, ``examples.json`` and
    ``index.html`` in ``directory``."""
    from trainables.evaluation.examples_page import examples_page  # (imports this module)
    from trainables.models import load_model

    device = model.pixel_mean.device
    undefended = load_model(config.model).to(device)
    # Fine-tuning changes the vision encoder only: both models share the frozen text tower, so the caption gallery's
    # features and the text attacks' word source are built once, from the undefended model.
    candidates = None
    if any(attack in TEXT_ATTACKS for attack in config.eval_attacks):
        from trainables.attacks.word_candidates import candidate_source  # local: may load transformers

        candidates = candidate_source(config.word_candidates, undefended, device)
    gallery_features = gallery_features_of(undefended, dataset, config.examples)
    examples, pictures = [], {}
    for encoder, victim in (("undefended", undefended), ("fine-tuned", model)):
        # One eps, the largest evaluated: the pictures are for looking, and each attack costs a run per encoder.
        found, drawn = encoder_examples(victim, encoder, dataset, tuple(config.eval_attacks), (max(config.eval_eps),),
                                        config.examples, config.seed, candidates, gallery_features)
        examples += found
        pictures |= drawn
    # The model's kind only: a spec's paths may hold what the platform redacts from params (a token in a folder name).
    context = {"model": _without_paths(config.model), "defense": config.defense.value, "training eps": eps_fraction(config.eps),
               "word source of text attacks": config.word_candidates, "seed": config.seed}
    write_examples(directory, examples, pictures, context)
    (directory / PAGE_FILE).write_text(examples_page(context, examples))
    return directory
