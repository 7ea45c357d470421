"""The embedded synthetic image-caption world: coloured shapes on plain backgrounds.

Needs no download and is deterministic by seed, so the end-to-end tests and quick
sweeps can train and evaluate retrieval on it. A scene is a few objects of one kind
(shape, colour, size, count) placed in one region of a plain background; every
image has exactly five captions, each a different phrasing template that mentions
*all* attributes, so any single caption identifies the scene (up to the small
position/shade jitter that makes images of equal scenes differ).

Rendering: PIL draws at 4x the target size (PIL polygons are not antialiased) and
``Image.reduce(4)`` box-averages down, which is exact area antialiasing.

Example:
    >>> world = SyntheticWorld("train", num_images=8, image_size=32, seed=0)
    >>> item = world[0]
    >>> item.image.shape, len(item.captions)
    (torch.Size([3, 32, 32]), 5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainables.data.items import ImageCaptionItem
from trainables.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Saturated, well-separated hues: they must stay distinct after downsampling to 32 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 220, 30),
    "purple": (145, 50, 195),
    "orange": (250, 140, 20),
}
# Disjoint from COLOURS, so an object is never the colour of its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (105, 65, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SPLITS: tuple[str, ...] = ("train", "test")
CAPTIONS_PER_IMAGE = 5
MIN_IMAGE_SIZE = 8  # below this a shape is a couple of pixels and the captions lie

_SUPERSAMPLE = 4
# Object circumradius as a fraction of the image side; the cluster layouts below are
# sized so that 3 large objects still fit in a region (half the image side).
_RADIUS = {"small": 0.07, "large": 0.105}
# Centre of each region (x, y) as fractions of the image side; a region is the
# half-side square around it, so left/right/top/bottom/center stay distinguishable.
_REGION_CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
_REGION_HALF = 0.25
_PAIR_SPACING = 1.25  # centre offset of a pair, in radii: leaves a gap of half a radius
_TRIO_SPACING = 1.3  # circumradius of a trio's triangle, in radii: side 2.25 r > 2 r
# Uniform numbers drawn per scene. One row of a (n, _DRAWS) array per scene makes
# scene i independent of n, so ``n=100`` is a prefix of ``n=500`` with the same seed.
_DRAWS = 16


@dataclass(frozen=True)
class Scene:
    """One scene: its attributes (what the captions say) and its layout jitter (what they don't).

    Attributes:
        shape, colour, size, count, position, background: the captioned attributes.
        offset: cluster centre shift from the region centre (x, y), fractions of the side.
        cluster_angle: rotation of the 2- or 3-object layout, radians.
        rotations: per-object rotation of the shape, radians (first ``count`` used).
        shade: per-channel integer jitter added to the object colour.
        background_shade: per-channel integer jitter added to the background colour.
    """

    shape: str
    colour: str
    size: str
    count: int
    position: str
    background: str
    offset: tuple[float, float] = (0.0, 0.0)
    cluster_angle: float = 0.0
    rotations: tuple[float, ...] = (0.0, 0.0, 0.0)
    shade: tuple[int, int, int] = (0, 0, 0)
    background_shade: tuple[int, int, int] = (0, 0, 0)


def _pick(options: tuple, u: float):
    """The option a uniform number in [0, 1) falls on."""
    return options[min(int(u * len(options)), len(options) - 1)]


def sample_scenes(split: str, num_images: int, seed: int) -> list[Scene]:
    """Draw ``num_images`` scenes for ``split``; train and test use disjoint seed streams."""
    # SeedSequence keyed by (seed, split index): two independent streams per seed.
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
    u = rng.random((num_images, _DRAWS))
    scenes = []
    for row in u:
        size = _pick(SIZES, row[2])
        count = _pick(COUNTS, row[3])
        r = _RADIUS[size]
        extent = r * {1: 1.0, 2: _PAIR_SPACING + 1.0, 3: _TRIO_SPACING + 1.0}[count]
        # Jitter only within 80% of the room left, so clusters never cross into the
        # neighbouring region's centre.
        room = 0.8 * max(_REGION_HALF - extent, 0.0)
        scenes.append(
            Scene(
                shape=_pick(SHAPES, row[0]),
                colour=_pick(tuple(COLOURS), row[1]),
                size=size,
                count=count,
                position=_pick(POSITIONS, row[4]),
                background=_pick(tuple(BACKGROUNDS), row[5]),
                offset=((2 * row[6] - 1) * room, (2 * row[7] - 1) * room),
                cluster_angle=float(row[8] * 2 * math.pi),
                rotations=tuple(float((2 * v - 1) * math.radians(15)) for v in row[9:12]),
                shade=tuple(int(round((2 * v - 1) * 15)) for v in row[12:15]),
                background_shade=(int(round((2 * row[15] - 1) * 10)),) * 3,
            )
        )
    return scenes


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius ``r`` around (cx, cy), in image y-down coordinates."""
    if shape == "square":
        polar = [(r, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        # -pi/2 points the apex up (y grows downwards).
        polar = [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        polar = [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        w = 0.35 * r  # half arm width
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                   (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + rho * math.cos(phi + angle), cy + rho * math.sin(phi + angle)) for rho, phi in polar]


def _object_centres(scene: Scene) -> list[tuple[float, float]]:
    """Object centres (fractions of the side) for the scene's count and layout."""
    rx, ry = _REGION_CENTRES[scene.position]
    cx, cy = rx + scene.offset[0], ry + scene.offset[1]
    r = _RADIUS[scene.size]
    if scene.count == 1:
        return [(cx, cy)]
    spacing = (_PAIR_SPACING if scene.count == 2 else _TRIO_SPACING) * r
    step = 2 * math.pi / scene.count  # pair: opposite points; trio: a triangle
    return [
        (cx + spacing * math.cos(scene.cluster_angle + k * step), cy + spacing * math.sin(scene.cluster_angle + k * step))
        for k in range(scene.count)
    ]


def _shaded(rgb: tuple[int, int, int], shade: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(rgb, shade))


def render(scene: Scene, image_size: int) -> np.ndarray:
    """Render ``scene`` as a uint8 array (image_size, image_size, 3)."""
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), _shaded(BACKGROUNDS[scene.background], scene.background_shade))
    draw = ImageDraw.Draw(canvas)
    fill = _shaded(COLOURS[scene.colour], scene.shade)
    r = _RADIUS[scene.size] * side
    for (fx, fy), angle in zip(_object_centres(scene), scene.rotations):
        _draw_shape(draw, scene.shape, fx * side, fy * side, r, angle, fill)
    return np.asarray(canvas.reduce(_SUPERSAMPLE))


_CIRCLE_SCALE = 0.85  # a circle of the full circumradius looks bigger than the polygons


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int]) -> None:
    """Draw one object with circumradius ``r`` around (cx, cy), canvas pixels."""
    if shape == "circle":
        rc = _CIRCLE_SCALE * r
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def shape_extent(shape: str, cx: float, cy: float, r: float, angle: float) -> tuple[float, float, float, float]:
    """The exact bounding box ``(x0, y0, x1, y1)`` of what :func:`_draw_shape` draws, same units.

    Computed from the same ellipse / polygon vertices the renderer uses, so a grounding
    box is the drawn object's box, not an estimate from pixels.
    """
    if shape == "circle":
        rc = _CIRCLE_SCALE * r
        return (cx - rc, cy - rc, cx + rc, cy + rc)
    xs, ys = zip(*_polygon(shape, cx, cy, r, angle))
    return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class PlacedObject:
    """One object of a multi-object scene (the grounding world).

    Attributes:
        shape, colour, size: as in :class:`Scene` (``size`` picks the radius from ``_RADIUS``).
        centre: (x, y) as fractions of the image side.
        rotation: rotation of the shape, radians.
        shade: per-channel integer jitter added to the colour.
    """

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    rotation: float = 0.0
    shade: tuple[int, int, int] = (0, 0, 0)

    def extent(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` as fractions of the image side."""
        return shape_extent(self.shape, self.centre[0], self.centre[1], _RADIUS[self.size], self.rotation)


def render_objects(objects: tuple[PlacedObject, ...], background: str, background_shade: tuple[int, int, int],
                   image_size: int) -> np.ndarray:
    """Render several objects of any kinds on one background, as :func:`render` does one kind."""
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), _shaded(BACKGROUNDS[background], background_shade))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = _shaded(COLOURS[obj.colour], obj.shade)
        _draw_shape(draw, obj.shape, obj.centre[0] * side, obj.centre[1] * side, _RADIUS[obj.size] * side, obj.rotation, fill)
    return np.asarray(canvas.reduce(_SUPERSAMPLE))


# ---- captions -------------------------------------------------------------------------

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_GROUP_WORDS = {1: "a single", 2: "a pair of", 3: "a group of three"}
# Size synonyms per template (index = template number).
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "small", "little", "tiny"),
    "large": ("large", "big", "big", "large", "huge"),
}
# Position phrasings per template (index = template number).
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left side", "in the left part", "toward the left", "on the left-hand side"),
    "right": ("on the right", "at the right side", "in the right part", "toward the right", "on the right-hand side"),
    "top": ("at the top", "near the top edge", "in the upper part", "toward the top", "in the top area"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower part", "toward the bottom", "in the bottom area"),
    "center": ("in the center", "in the middle", "in the central part", "toward the center", "in the central area"),
}


def describe(scene: Scene) -> tuple[str, ...]:
    """The scene's five captions: five templates with different word orders, synonyms and
    number styles (words, digits, "a pair of"), each mentioning every attribute."""
    n, colour, bg = scene.count, scene.colour, scene.background
    noun = scene.shape if n == 1 else _PLURALS[scene.shape]
    size = SIZE_WORDS[scene.size]
    pos = POSITION_WORDS[scene.position]
    is_are = "is" if n == 1 else "are"
    it_they = "it is" if n == 1 else "they are"
    captions = (
        f"{_NUMBER_WORDS[n]} {size[0]} {colour} {noun} {pos[0]} over a {bg} background",
        f"a {bg} picture with {n} {size[1]} {colour} {noun} {pos[1]}",
        f"{pos[2]} of a {bg} image there {is_are} {_NUMBER_WORDS[n]} {colour} {noun} that {is_are} {size[2]}",
        f"{_GROUP_WORDS[n]} {size[3]} {colour} {noun} {pos[3]} on a {bg} backdrop",
        f"there {is_are} {n} {colour} {noun} {pos[4]} and {it_they} {size[4]}; the background is {bg}",
    )
    assert len(set(captions)) == CAPTIONS_PER_IMAGE, captions  # templates differ structurally
    return captions


# ---- dataset --------------------------------------------------------------------------


class SyntheticWorld(torch.utils.data.Dataset):
    """``num_images`` pre-rendered scenes of one split, as :class:`ImageCaptionItem`.

    All images sit in one uint8 tensor (N, 3, H, W) (5,000 images at 32 px are 15 MB);
    ``__getitem__`` converts one to float32 in [0, 1]. Item ``i`` depends only on
    (split, seed, i, image_size), not on ``num_images``.

    Args:
        split: ``train`` or ``test`` (disjoint random streams for the same seed).
        num_images: how many images (>= 1).
        image_size: side length in pixels (>= 8); 32, 64 and 224 all work.
        seed: non-negative integer.
    """

    def __init__(self, split: str, num_images: int, image_size: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"synthetic split {split!r} does not exist: use one of {', '.join(SPLITS)}")
        if num_images < 1:
            raise UserError(f"synthetic world asked for {num_images} images: ask for at least 1 (n=...)")
        if image_size < MIN_IMAGE_SIZE:
            raise UserError(f"synthetic image size {image_size} is too small to draw shapes: use at least {MIN_IMAGE_SIZE}")
        if seed < 0:
            raise UserError(f"synthetic seed {seed} is negative: use a seed >= 0")
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.scenes: tuple[Scene, ...] = tuple(sample_scenes(split, num_images, seed))
        self.captions: tuple[tuple[str, ...], ...] = tuple(describe(s) for s in self.scenes)
        pixels = np.stack([render(s, image_size) for s in self.scenes])  # (N, H, W, 3)
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.scenes)

    def item_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{index}"

    def __getitem__(self, index: int) -> ImageCaptionItem:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a synthetic world of {len(self)} images")
        index %= len(self)
        return ImageCaptionItem(
            image=self.images[index].to(torch.float32).div_(255.0),
            captions=self.captions[index],
            item_id=self.item_id(index),
        )

    def caption_records(self) -> list[tuple[str, tuple[str, ...]]]:
        """(item_id, captions) of every item, without converting images (for caption checks)."""
        return [(self.item_id(i), caps) for i, caps in enumerate(self.captions)]
