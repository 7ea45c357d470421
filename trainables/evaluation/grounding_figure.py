"""Grounding made visible: where GradCAM falls, which proposal wins, clean and under attack, per vision encoder.

For a few referring expressions and each encoder (the undefended ALBEF/TCL model and each
fine-tuned vision encoder swapped into it), the item is attacked white-box on that encoder
(the grounding evaluation's own attacks: PGD on the ITM logit, Co-attack on the raw
``[CLS]`` features) and the panel shows what the evaluation scores: ALBEF's GradCAM of the
ITM match logit over the scored image, every proposal, the one chosen (``sum / area ** 0.5``)
and the ground-truth box, with the IoU that makes it a hit or a miss. The numbers of
``docs/grounding.md`` are counts of exactly these decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from trainables.attacks.base import eval_mode
from trainables.data.grounding import collate_grounding
from trainables.evaluation.examples import changed_words
from trainables.evaluation.gradcam import heat_overlay, upsample_map
from trainables.evaluation.gradcam_figure import marked_words
from trainables.evaluation.grounding import HIT_IOU, box_iou, choose_proposal
from trainables.evaluation.grounding_eval import grounding_maps, run_grounding_attack
from trainables.names import CLEAN, eps_fraction
from trainables.seeds import EXAMPLES, derive_seed

HIT_COLOUR, MISS_COLOUR, TRUTH_COLOUR, PROPOSAL_COLOUR = "#1a7f37", "#b42318", "#ffffff", "#9aa0a6"


@dataclass(frozen=True)
class GroundingPanel:
    """One cell: one expression under one attack on one encoder.

    ``picture``: (3, H, W) the scored image (model resolution) with its GradCAM map over it; ``heat``:
    (H, W) the map at that resolution; ``original_size``: (height, width) the boxes are in;
    ``chosen``: the index of the winning proposal; ``iou``: its IoU with ``box``. ``pair`` is the
    item's position in the figure (the name ``map_agreement`` groups by).
    """

    encoder: str
    pair: int
    attack: str
    eps: float | None
    picture: torch.Tensor
    heat: torch.Tensor
    expression: str
    changed: list[int]
    box: tuple[float, ...]
    proposals: tuple[tuple[float, ...], ...]
    chosen: int
    iou: float
    original_size: tuple[int, int]

    @property
    def hit(self) -> bool:
        return self.iou >= HIT_IOU


def grounding_panels(models: dict[str, object], dataset, indices: list[int], attacks: tuple[str, ...], eps: float,
                     seed: int = 0, candidates=None, layer: int | None = None) -> list[GroundingPanel]:
    """Panels for ``dataset[indices]`` clean and under each attack, for each named model (attacked white-box).

    Every model needs ``itm_cross_attention`` (an ALBEF/TCL checkpoint with an ITM head); models' modes
    are restored. The choice of box is the evaluation's (``batch_hits``): the map upsampled to the
    original image, proposals scored there.
    """
    batch = collate_grounding([dataset[i] for i in indices])
    panels = []
    for encoder, model in models.items():
        device = model.pixel_mean.device
        images = batch.images.to(device)
        with eval_mode(model):
            for run_index, attack in enumerate((CLEAN,) + tuple(attacks)):
                scored, expressions = images, list(batch.expressions)
                if attack != CLEAN:
                    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, EXAMPLES, run_index))
                    scored, expressions, _ = run_grounding_attack(attack, model, images, expressions, eps, generator, candidates)
                maps = grounding_maps(model, scored, expressions, layer).cpu()
                heats = upsample_map(maps, tuple(scored.shape[-2:]))
                pictures = heat_overlay(scored.cpu(), heats)
                for b, box in enumerate(batch.boxes):
                    proposals = batch.proposals[b]
                    chosen = choose_proposal(maps[b], batch.original_sizes[b], proposals)
                    panels.append(GroundingPanel(
                        encoder=encoder, pair=b, attack=attack, eps=None if attack == CLEAN else eps, picture=pictures[b],
                        heat=heats[b], expression=expressions[b],
                        changed=changed_words(batch.expressions[b], expressions[b]), box=tuple(box),
                        proposals=tuple(tuple(p[:4]) for p in proposals), chosen=chosen,
                        iou=box_iou(box, proposals[chosen][:4]), original_size=tuple(batch.original_sizes[b])))
    return panels


def _box(axes, box, colour: str, width: float, style: str = "-") -> None:
    x, y, w, h = box[:4]
    axes.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=width, linestyle=style))


def draw_grounding_panels(panels: list[GroundingPanel], title: str) -> Figure:
    """A grid: one row per expression, one column per encoder x attack (clean first).

    Each cell: the map over the scored image, the proposals (thin grey), the ground truth
    (dashed white) and the chosen proposal (green: a hit, IoU >= 0.5; red: a miss), with the
    scored expression and the IoU below.
    """
    columns = list(dict.fromkeys((p.encoder, p.attack, p.eps) for p in panels))
    rows = list(dict.fromkeys(p.pair for p in panels))
    cell = {(p.pair, p.encoder, p.attack): p for p in panels}
    width, height = max(2.1 * len(columns) + 0.8, 6.0), 2.6 * len(rows) + 1.1
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=9, y=1 - 0.12 / height)
    figure.text(0.5, 1 - 0.62 / height, "proposals grey, ground truth dashed white, chosen box green (hit) or red (miss)",
                ha="center", fontsize=7)
    grid = figure.add_gridspec(len(rows), len(columns), hspace=0.45, wspace=0.2, left=0.6 / width, right=1 - 0.1 / width,
                               top=1 - 1.05 / height, bottom=0.55 / height)
    for r, pair in enumerate(rows):
        for c, (encoder, attack, eps) in enumerate(columns):
            panel = cell.get((pair, encoder, attack))
            axes = figure.add_subplot(grid[r, c])
            axes.set_xticks([])
            axes.set_yticks([])
            if panel is None:
                axes.set_axis_off()
                continue
            height_px, width_px = panel.original_size
            # The picture is at the model's resolution; drawn over the original extent so the boxes fit.
            axes.imshow(panel.picture.permute(1, 2, 0).numpy(), interpolation="nearest", extent=(0, width_px, height_px, 0))
            for proposal in panel.proposals:
                _box(axes, proposal, PROPOSAL_COLOUR, 0.6)
            _box(axes, panel.box, TRUTH_COLOUR, 1.4, "--")
            _box(axes, panel.proposals[panel.chosen], HIT_COLOUR if panel.hit else MISS_COLOUR, 1.8)
            axes.set_xlim(0, width_px)
            axes.set_ylim(height_px, 0)
            if r == 0:
                label = attack if eps is None else f"{attack} {eps_fraction(eps)}"
                axes.set_title(f"{encoder}\n{label}", fontsize=8, fontweight="bold")
            if c == 0:
                axes.set_ylabel(f"item {pair}", fontsize=8)
            verdict = f"{'hit' if panel.hit else 'miss'}: IoU {panel.iou:.2f}"
            axes.set_xlabel(f"{marked_words(panel.expression, panel.changed, 26)}\n{verdict}", fontsize=6.5,
                            color=HIT_COLOUR if panel.hit else MISS_COLOUR)
    return figure
