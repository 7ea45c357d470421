"""Visual entailment on the synthetic shapes world: hypotheses labelled from the generator's truth.

Premises are the scenes of ``synthetic:<split>`` (same seed, same images). Pair ``i``
judges scene ``i // 3`` and has class ``(entailment, neutral, contradiction)[i % 3]``,
so every scene gets one hypothesis of each class and the classes are balanced
(counts differ by at most one); pair ``i`` depends only on (split, seed, i).

* **entailment**: a true statement about a random subset (1-3) of the scene's six
  attributes (count, size, colour, shape, position, background): "there are two stars".
* **contradiction**: the same kind of statement with exactly one mentioned attribute
  changed to another value of its domain; half of them also carry a hidden clause
  (below), which does not rescue a false conjunction.
* **neutral**: a true statement about 1-2 attributes joined with a clause about a
  property the renderer never draws ("made of wood", "drawn by a child"), so the
  image cannot decide it.

A hypothesis-only reader can spot the hidden clause, which rules out entailment: the
best text-only accuracy is 2/3 (hidden clause -> neutral, none -> entailment);
chance is 1/3. Beating 2/3 needs the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainables.data.entailment import CONTRADICTION, ENTAILMENT, LABEL_NAMES, NEUTRAL, EntailmentItem
from trainables.data.synthetic import BACKGROUNDS, COLOURS, COUNTS, POSITION_WORDS, POSITIONS, SHAPES, SIZE_WORDS, SIZES, SPLITS, Scene, SyntheticWorld
from trainables.errors import UserError

CLASS_CYCLE = (ENTAILMENT, NEUTRAL, CONTRADICTION)
ATTRIBUTES = ("count", "size", "colour", "shape", "position", "background")
DOMAINS: dict[str, tuple] = {
    "count": COUNTS,
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Properties no pixel shows: a clause about them is neither entailed nor contradicted.
HIDDEN_CLAUSES = ("made of wood", "made of paper", "made of metal", "made of glass", "drawn by a child", "painted yesterday")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_HYPOTHESIS_STREAM = 1  # SeedSequence key separating hypothesis draws from the scenes' stream


def _values(scene: Scene) -> dict[str, object]:
    return {name: getattr(scene, name) for name in ATTRIBUTES}


def statement(values: dict[str, object], count: int, hidden: str | None, variant: int) -> str:
    """A sentence asserting ``values`` (a subset of attributes) and the ``hidden`` clause.

    ``count`` sets grammatical number when ``values`` has no count (the scene's count,
    so "there are red shapes" stays true); ``variant`` picks opening and synonyms.
    """
    n = int(values.get("count", count))
    words = []
    if "count" in values:
        words.append(_COUNT_WORDS[n])
    elif n == 1:
        words.append("a")
    if "size" in values:
        words.append(SIZE_WORDS[values["size"]][variant % len(SIZE_WORDS[values["size"]])])
    if "colour" in values:
        words.append(str(values["colour"]))
    shape = str(values.get("shape", "shape"))
    words.append(shape if n == 1 else _PLURALS.get(shape, "shapes"))
    if hidden:
        words.append(hidden)
    if "position" in values:
        phrases = POSITION_WORDS[values["position"]]
        words.append(phrases[variant % len(phrases)])
    if "background" in values:
        words.append(f"on a {values['background']} background")
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    opening = ("there is" if n == 1 else "there are") if variant % 2 == 0 else "the picture shows"
    return f"{opening} {' '.join(words)}"


def hypothesis(scene: Scene, label: int, rng: np.random.Generator) -> str:
    """One hypothesis of class ``label`` about ``scene``."""
    truth = _values(scene)
    variant = int(rng.integers(0, 10))
    if label == NEUTRAL:
        chosen = rng.choice(len(ATTRIBUTES), size=int(rng.integers(1, 3)), replace=False)
        values = {ATTRIBUTES[k]: truth[ATTRIBUTES[k]] for k in sorted(chosen)}
        return statement(values, scene.count, HIDDEN_CLAUSES[int(rng.integers(len(HIDDEN_CLAUSES)))], variant)
    chosen = rng.choice(len(ATTRIBUTES), size=int(rng.integers(1, 4)), replace=False)
    values = {ATTRIBUTES[k]: truth[ATTRIBUTES[k]] for k in sorted(chosen)}
    hidden = None
    if label == CONTRADICTION:
        changed = ATTRIBUTES[int(chosen[int(rng.integers(len(chosen)))])]
        others = [value for value in DOMAINS[changed] if value != truth[changed]]
        values[changed] = others[int(rng.integers(len(others)))]
        if rng.random() < 0.5:
            hidden = HIDDEN_CLAUSES[int(rng.integers(len(HIDDEN_CLAUSES)))]
    return statement(values, scene.count, hidden, variant)


class SyntheticEntailment(torch.utils.data.Dataset):
    """``num_pairs`` (scene, hypothesis, label) pairs of one split, as :class:`EntailmentItem`.

    Args:
        split: ``train`` or ``test``.
        num_pairs: how many pairs (>= 1); they use ``ceil(num_pairs / 3)`` scenes.
        image_size: side length in pixels.
        seed: non-negative integer; the scenes are ``synthetic:<split>``'s for this seed.
    """

    def __init__(self, split: str, num_pairs: int, image_size: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"synthetic-ve split {split!r} does not exist: use one of {', '.join(SPLITS)}")
        if num_pairs < 1:
            raise UserError(f"synthetic-ve asked for {num_pairs} pairs: ask for at least 1 (n=...)")
        self.split = split
        self.world = SyntheticWorld(split, math.ceil(num_pairs / len(CLASS_CYCLE)), image_size=image_size, seed=seed)
        self.labels: list[int] = [CLASS_CYCLE[i % len(CLASS_CYCLE)] for i in range(num_pairs)]
        split_index = SPLITS.index(split)
        self.hypotheses: list[str] = []
        for i, label in enumerate(self.labels):
            # One generator per pair keyed by its index: pair i is the same for any num_pairs.
            rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, _HYPOTHESIS_STREAM, i]))
            self.hypotheses.append(hypothesis(self.world.scenes[i // len(CLASS_CYCLE)], label, rng))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> EntailmentItem:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic entailment pairs")
        index %= len(self)
        scene = index // len(CLASS_CYCLE)
        return EntailmentItem(
            image=self.world.images[scene].to(torch.float32).div_(255.0),
            hypothesis=self.hypotheses[index],
            label=self.labels[index],
            item_id=f"synthetic-ve-{self.split}-{index}",
            image_id=self.world.item_id(scene),
        )

    def premise_captions(self, index: int) -> tuple[str, ...]:
        """The five captions of pair ``index``'s premise scene (MAVA's SGA caption sets take the first four)."""
        return self.world.captions[(index % len(self)) // len(CLASS_CYCLE)]

    def ve_records(self) -> list[dict[str, str]]:
        """The pairs in ALBEF's ``ve_*.json`` form (``image`` = the premise's item id)."""
        return [
            {"image": self.world.item_id(i // len(CLASS_CYCLE)), "sentence": text, "label": LABEL_NAMES[label]}
            for i, (text, label) in enumerate(zip(self.hypotheses, self.labels))
        ]
