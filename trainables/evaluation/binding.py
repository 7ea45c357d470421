"""Does a fusion model's ITM head bind a colour to a shape, or does it count words?

On a multi-object grounding scene with two objects A and B that differ in colour and in shape,
"the <A's colour> <A's shape>" is true, and the *rebound* expression "the <B's colour> <A's
shape>" is false although each of its words fits some object (no object has that colour and that
shape). An ITM head that scores the true expression above the rebound one on about half the scenes
does not bind; it answers "is there something red, is there a circle". The control replaces the
colour by one no object has: a head that reads the words at all scores the true expression higher
there. GradCAM grounding reads the map off this head, so a head that does not bind cannot put the
map on the one object both words name (docs/grounding.md, "Why ALBEF's recipe alone stays below 50%").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainables.data.synthetic import COLOURS

BATCH = 250


@dataclass(frozen=True)
class BindingCase:
    """One scene's three expressions: true, rebound (every word fits some object, no object fits both), absent colour."""

    index: int
    true: str
    rebound: str
    absent: str


def binding_cases(scenes) -> list[BindingCase]:
    """One case per scene (``GroundingScene``) that has a pair to rebind: the first pair A, B in object order."""
    cases = []
    for index, scene in enumerate(scenes):
        looks = {(obj.colour, obj.shape) for obj in scene.objects}
        free = [colour for colour in COLOURS if colour not in {obj.colour for obj in scene.objects}]
        pair = next(((a, b) for a in scene.objects for b in scene.objects
                     if a.colour != b.colour and a.shape != b.shape and (b.colour, a.shape) not in looks), None)
        if pair is None or not free:
            continue
        a, b = pair
        cases.append(BindingCase(index, f"the {a.colour} {a.shape}", f"the {b.colour} {a.shape}",
                                 f"the {free[index % len(free)]} {a.shape}"))
    return cases


@torch.no_grad()
def binding_rates(model, images: torch.Tensor, cases: list[BindingCase]) -> dict[str, float]:
    """% of cases whose true expression's ITM logit beats the rebound one's and the absent colour's (a tie counts half).

    ``images``: (N, 3, H, W) in [0, 1], indexed by ``case.index``; ``model`` has ``image_tokens`` and
    ``itm_pair_logits`` (an ALBEF/TCL ``AlbefVLP``).
    """
    wins = {"rebound": 0.0, "absent": 0.0}
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        tokens = model.image_tokens(images[[case.index for case in batch]])
        true = model.itm_pair_logits(tokens, [case.true for case in batch])
        for name in wins:
            other = model.itm_pair_logits(tokens, [getattr(case, name) for case in batch])
            wins[name] += float((true > other).sum() + 0.5 * (true == other).sum())  # a tie is no preference
    return {name: 100.0 * count / len(cases) for name, count in wins.items()}
