"""Visual grounding on the synthetic shapes world: several objects, one referring expression.

A scene has 2-4 objects in distinct cells of a 3x3 grid (jittered inside the cell), each
with its own shape, colour and size, on one background. One object is the target; the
expression picks exactly it:

* **attribute** expressions ("the red circle", "the small square"): every other object
  differs from the target in (colour, shape); the expression is a random subset of the
  target's (size, colour, shape) that matches it alone;
* **position** expressions ("the small red circle on the left"): the scene holds a
  *twin* (same shape, colour and size), so a relative position is needed: the target
  is strictly the left-/right-most (by grid column) or top-/bottom-most (by row) of
  the objects the attribute words match.

Splits: ``train`` items mix both kinds (half each); ``test`` item ``i`` is in split
``("val", "testA", "testB")[i % 3]``: ``testA`` only attribute expressions (like
RefCOCO+, which forbids location words), ``testB`` only position expressions, ``val``
mixed. This is the synthetic analogue, not RefCOCO+'s people/objects split.

Boxes are ``[x, y, w, h]`` in the pixels of an original image of ``resolution`` px
(rendered at the model's size; the box is computed from the renderer's own vertices,
:func:`trainables.data.synthetic.shape_extent`, so it is exact). Proposals are every
object's box plus up to two distractors (a jittered near-miss box and a random box,
each with IoU < 0.5 against every object), shuffled. Item ``i`` depends only on
(split, seed, i, resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from trainables.data.grounding import GroundingItem
from trainables.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, SIZES, SPLITS, PlacedObject, _RADIUS, render_objects
from trainables.errors import UserError
from trainables.evaluation.grounding import HIT_IOU, box_iou

TEST_SPLITS = ("val", "testA", "testB")
GRID = 3
MIN_OBJECTS, MAX_OBJECTS = 2, 4
DISTRACTORS = 2
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_WORDS = ("size", "colour", "shape")
_STREAM = 2  # SeedSequence key: grounding scenes are not the captioning world's scenes
_ATTEMPTS = 20  # draws per distractor before giving up on it (the item then has fewer proposals)


@dataclass(frozen=True)
class GroundingScene:
    """A sampled grounding scene: its objects (target first), background, expression and kind."""

    objects: tuple[PlacedObject, ...]
    cells: tuple[int, ...]
    background: str
    background_shade: tuple[int, int, int]
    expression: str
    needs_position: bool


def _matches(obj: PlacedObject, target: PlacedObject, words: tuple[str, ...]) -> bool:
    return all(getattr(obj, word) == getattr(target, word) for word in words)


def _strict_extreme(cells: list[int], target: int, direction: str) -> bool:
    """True when cell ``target`` is strictly the most ``direction`` of ``cells`` (row-major 3x3)."""
    key = {"left": lambda c: c % GRID, "right": lambda c: -(c % GRID), "top": lambda c: c // GRID, "bottom": lambda c: -(c // GRID)}[direction]
    best = min(key(c) for c in cells)
    return key(target) == best and sum(key(c) == best for c in cells) == 1


def _phrase(target: PlacedObject, words: tuple[str, ...], direction: str | None) -> str:
    parts = ["the"]
    if "size" in words:
        parts.append(target.size)
    if "colour" in words:
        parts.append(target.colour)
    parts.append(target.shape if "shape" in words else "shape")
    if direction:
        parts.append(POSITION_PHRASES[direction])
    return " ".join(parts)


def sample_scene(rng: np.random.Generator, needs_position: bool) -> GroundingScene:
    """One scene and its expression; ``needs_position`` puts a twin of the target in the scene."""
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = [int(c) for c in rng.permutation(GRID * GRID)[:count]]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    looks = [(pick(SHAPES), pick(tuple(COLOURS)), pick(SIZES))]
    if needs_position:
        looks.append(looks[0])
    while len(looks) < count:
        look = (pick(SHAPES), pick(tuple(COLOURS)), pick(SIZES))
        if look[:2] != looks[0][:2]:  # only a twin may share the target's colour and shape
            looks.append(look)
    objects = []
    for cell, (shape, colour, size) in zip(cells, looks):
        room = 0.8 * (0.5 / GRID - _RADIUS[size])  # stay inside the cell
        cx = (cell % GRID + 0.5) / GRID + (2 * rng.random() - 1) * room
        cy = (cell // GRID + 0.5) / GRID + (2 * rng.random() - 1) * room
        objects.append(PlacedObject(shape, colour, size, (cx, cy), float((2 * rng.random() - 1) * np.radians(15)),
                                    tuple(int(round((2 * v - 1) * 15)) for v in rng.random(3))))
    target = objects[0]
    options: list[tuple[tuple[str, ...], str | None]] = []
    for k in range(1, len(_WORDS) + 1):
        for words in combinations(_WORDS, k):
            matching = [cell for obj, cell in zip(objects, cells) if _matches(obj, target, words)]
            if not needs_position and len(matching) == 1:
                options.append((words, None))
            elif needs_position:
                options.extend((words, d) for d in POSITION_PHRASES if _strict_extreme(matching, cells[0], d))
    words, direction = options[int(rng.integers(len(options)))]
    background = pick(tuple(BACKGROUNDS))
    return GroundingScene(tuple(objects), tuple(cells), background, (int(round((2 * rng.random() - 1) * 10)),) * 3,
                          _phrase(target, words, direction), needs_position)


def object_box(obj: PlacedObject, resolution: int) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` of the drawn object in pixels of a ``resolution``-px image."""
    x0, y0, x1, y1 = (v * resolution for v in obj.extent())
    return (x0, y0, x1 - x0, y1 - y0)


def _distractors(rng: np.random.Generator, boxes: list[tuple[float, ...]], resolution: int) -> list[tuple[float, ...]]:
    """A near-miss box (a shifted, rescaled object box) and a random box, each IoU < 0.5 with every object."""
    out = []
    for kind in ("near", "random"):
        for _ in range(_ATTEMPTS):
            if kind == "near":
                x, y, w, h = boxes[0] if rng.random() < 0.5 else boxes[int(rng.integers(len(boxes)))]
                scale = 0.8 + 0.45 * rng.random()
                shift = (0.5 + 0.4 * rng.random()) * rng.choice([-1, 1])
                along_x = rng.random() < 0.5
                x, y = x + (shift * w if along_x else 0.0), y + (0.0 if along_x else shift * h)
                w, h = w * scale, h * scale
            else:
                w, h = (0.12 + 0.23 * rng.random(2)) * resolution
                x, y = rng.random() * (resolution - w), rng.random() * (resolution - h)
            x0, y0 = max(0.0, x), max(0.0, y)
            w, h = min(resolution, x + w) - x0, min(resolution, y + h) - y0
            box = (float(x0), float(y0), float(w), float(h))
            if w >= 2 and h >= 2 and all(box_iou(box, other) < HIT_IOU for other in boxes):
                out.append(box)
                break
    return out


class SyntheticGrounding(torch.utils.data.Dataset):
    """``num_refs`` grounding scenes of one split, one referring expression each, as :class:`GroundingItem`.

    Args:
        split: ``train`` or ``test`` (test items carry val / testA / testB).
        num_refs: how many scenes (>= 1).
        image_size: side of the model-input image in pixels.
        seed: non-negative integer.
        resolution: side of the "original" image the boxes and proposals are in (>= image_size
            exercises the upsampling of the GradCAM map).
    """

    def __init__(self, split: str, num_refs: int, image_size: int = 32, seed: int = 0, resolution: int = 64):
        if split not in SPLITS:
            raise UserError(f"synthetic-vg split {split!r} does not exist: use one of {', '.join(SPLITS)}")
        if num_refs < 1:
            raise UserError(f"synthetic-vg asked for {num_refs} scenes: ask for at least 1 (n=...)")
        self.split, self.image_size, self.resolution = split, image_size, resolution
        self.scenes: list[GroundingScene] = []
        self.splits: list[str] = []
        self.proposals: list[tuple[tuple[float, ...], ...]] = []
        self.boxes: list[tuple[float, ...]] = []
        for i in range(num_refs):
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), _STREAM, i]))
            item_split = "train" if split == "train" else TEST_SPLITS[i % len(TEST_SPLITS)]
            twin = {"testA": False, "testB": True}.get(item_split, bool(rng.random() < 0.5))
            scene = sample_scene(rng, twin)
            boxes = [object_box(obj, resolution) for obj in scene.objects]
            proposals = boxes + _distractors(rng, boxes, resolution)
            order = rng.permutation(len(proposals))
            self.scenes.append(scene)
            self.splits.append(item_split)
            self.boxes.append(boxes[0])
            self.proposals.append(tuple(proposals[k] for k in order))
        pixels = np.stack([render_objects(s.objects, s.background, s.background_shade, image_size) for s in self.scenes])
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> GroundingItem:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic grounding scenes")
        index %= len(self)
        return GroundingItem(
            image=self.images[index].to(torch.float32).div_(255.0),
            expression=self.scenes[index].expression,
            box=self.boxes[index],
            proposals=self.proposals[index],
            split=self.splits[index],
            item_id=f"synthetic-vg-{self.split}-{index}",
            image_id=f"synthetic-vg-{self.split}-{index}",
            original_size=(self.resolution, self.resolution),
        )


def _expression_parts(expression: str) -> tuple[dict[str, str], str | None]:
    """The attribute words (``{"colour": "red", ...}``) and position direction of an expression :func:`_phrase` wrote."""
    values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}
    words = {attribute: word for word in expression.split() for attribute, options in values.items() if word in options}
    direction = next((d for d, phrase in POSITION_PHRASES.items() if expression.endswith(phrase)), None)
    return words, direction


def attribute_oracle_accuracy(dataset: SyntheticGrounding, seen: tuple[str, ...] = ("size", "colour"),
                              position: bool = False) -> dict[str, float]:
    """The ceiling of a grounder blind to some attributes: expected accuracy (percent; ``acc`` and ``acc_<split>``).

    The oracle localises every object exactly (never a distractor box), reads only the expression's
    ``seen`` attribute words (and, with ``position``, its position phrase, among the objects it can
    tell apart) and picks uniformly among the objects that fit. With every attribute and position
    it is 100 by construction (each expression picks exactly its target).
    """
    unknown = set(seen) - set(_WORDS)
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(sorted(unknown))}: use {', '.join(_WORDS)}")
    scores: dict[str, list[float]] = {}
    for scene, split in zip(dataset.scenes, dataset.splits):
        words, direction = _expression_parts(scene.expression)
        fit = [k for k, obj in enumerate(scene.objects) if all(getattr(obj, a) == v for a, v in words.items() if a in seen)]
        if position and direction:
            cells = [scene.cells[k] for k in fit]
            fit = [k for k in fit if _strict_extreme(cells, scene.cells[k], direction)] or fit
        scores.setdefault(split, []).append(float(0 in fit) / len(fit))  # the target is object 0
    every = [score for values in scores.values() for score in values]
    return {"acc": 100.0 * sum(every) / len(every), **{f"acc_{s}": 100.0 * sum(v) / len(v) for s, v in scores.items()}}
