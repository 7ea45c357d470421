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
