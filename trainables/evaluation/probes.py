"""Which of the synthetic world's attributes does an encoder's feature hold? Linear probes.

For each captioned attribute (shape, colour, size, count, position, background) a multinomial
logistic regression (scikit-learn) is fitted on standardised features of training scenes and
scored on test scenes. A probe near chance says the feature does not hold the attribute in a
linearly readable form, so a retrieval model that ranks by that feature's cosine cannot use it,
however well the rest of the model sees it. ``platform.probe`` is the command.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from trainables.data.synthetic import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES

ATTRIBUTES: dict[str, tuple] = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "count": COUNTS,
                                "position": POSITIONS, "background": tuple(BACKGROUNDS)}


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of one attribute's probe (percent) and the chance rate: the test split's majority class."""

    accuracy: float
    chance: float


def attribute_labels(scenes) -> dict[str, np.ndarray]:
    """{attribute: (N,) class index of each scene}."""
    return {name: np.array([values.index(getattr(scene, name)) for scene in scenes]) for name, values in ATTRIBUTES.items()}


def probe(train_features: torch.Tensor, train_labels: np.ndarray, test_features: torch.Tensor, test_labels: np.ndarray,
          seed: int = 0) -> ProbeResult:
    """Fit a linear classifier on the (standardised) training features; its accuracy on the test features."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    predicted = classifier.fit(train_features.double().numpy(), train_labels).predict(test_features.double().numpy())
    majority = np.bincount(test_labels).max()
    return ProbeResult(accuracy=100.0 * float((predicted == test_labels).mean()), chance=100.0 * majority / len(test_labels))


def probe_attributes(train_features: torch.Tensor, train_scenes, test_features: torch.Tensor, test_scenes) -> dict[str, ProbeResult]:
    """One probe per attribute, in ``ATTRIBUTES``' order."""
    train_labels, test_labels = attribute_labels(train_scenes), attribute_labels(test_scenes)
    return {name: probe(train_features, train_labels[name], test_features, test_labels[name]) for name in ATTRIBUTES}


# Patch probes: does each ViT output token still describe its own patch? GradCAM grounding needs
# it (the map is read off the cross-attention to the patch tokens); a ViT whose tokens mixed the
# whole scene could not put the map on one object however well the fusion layers bind words.
PATCH_CLASSES: tuple[str, ...] = (*COLOURS, "background")
MIN_OBJECT_PIXELS = 4  # of a 4x4 patch: fewer are antialiased edges, whose nearest palette colour can lie


def patch_colour_labels(images: torch.Tensor, patch_size: int, min_pixels: int = MIN_OBJECT_PIXELS) -> np.ndarray:
    """(N, patches) index into ``PATCH_CLASSES`` per patch of uint8 or [0, 1] images (N, 3, H, W), row-major.

    Every pixel is named by its nearest palette colour (objects and backgrounds); a patch is the
    object colour covering most of its pixels if that colour covers at least ``min_pixels``, else
    background.
    """
    pixels = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    palette = torch.tensor([*COLOURS.values(), *BACKGROUNDS.values()], dtype=torch.float32) / 255.0
    n, _, height, width = pixels.shape
    nearest = torch.cdist(pixels.permute(0, 2, 3, 1).reshape(-1, 3), palette).argmin(1).reshape(n, height, width)
    rows, cols = height // patch_size, width // patch_size
    per_patch = nearest[:, :rows * patch_size, :cols * patch_size].reshape(n, rows, patch_size, cols, patch_size)
    per_patch = per_patch.permute(0, 1, 3, 2, 4).reshape(n, rows * cols, patch_size * patch_size)
    counts = torch.stack([(per_patch == k).sum(-1) for k in range(len(COLOURS))], dim=-1)  # (N, patches, colours)
    best = counts.max(-1)
    return torch.where(best.values >= min_pixels, best.indices, len(COLOURS)).numpy()


def probe_patch_colour(train_tokens: torch.Tensor, train_labels: np.ndarray, test_tokens: torch.Tensor, test_labels: np.ndarray,
                       seed: int = 0) -> dict[str, ProbeResult]:
    """The object colour of each object patch, read from its own token and from another patch's token of the same image.

    Tokens are (N, patches, width), labels (N, patches) from :func:`patch_colour_labels`; only
    object patches are probed. ``own``: the patch's own token. ``other``: the token of a random
    other patch of the same image (the control: a token that mixed the whole scene would read
    the colour as well from there; a local one reads only the scene's colours in general).
    """
    generator = np.random.default_rng(seed)
    results = {}
    for name in ("own", "other"):
        features, labels = [], []
        for tokens, patch_labels in ((train_tokens, train_labels), (test_tokens, test_labels)):
            image, patch = np.nonzero(patch_labels < len(COLOURS))
            if name == "other":  # any patch but its own: shift by 1..patches-1, wrapping
                patch = (patch + generator.integers(1, patch_labels.shape[1], len(patch))) % patch_labels.shape[1]
            features.append(tokens[torch.from_numpy(image), torch.from_numpy(patch)])
            labels.append(patch_labels[np.nonzero(patch_labels < len(COLOURS))])
        results[name] = probe(features[0], labels[0], features[1], labels[1], seed)
    return results
