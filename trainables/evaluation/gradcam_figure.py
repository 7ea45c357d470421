"""The paper's Figure 5: GradCAM of a VE model on clean and adversarial pairs, per vision encoder.

For a few entailment pairs and each encoder (the undefended base and each fine-tuned
vision encoder swapped into the same ALBEF/TCL VE model), the pair is attacked white-box
on that encoder (each attack at one eps), and the picture is ALBEF's GradCAM of the VE
head's logit for the pair's *true* class over the (adversarial) premise image, with the
(adversarial) hypothesis: where the model looks for evidence of the right answer. Each
panel also says what the model predicts and the probability it gives the true class, so a
map is never read without the decision it explains.

The attacks are the entailment evaluation's own (``trainables.evaluation.entailment_eval``:
PGD on the classifier, Co-attack on the raw ``[CLS]`` features, SGA with the premise's
caption set), seeded per (pair batch, attack) so that a figure is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainables.attacks.base import eval_mode
from trainables.data.entailment import LABEL_NAMES, collate_entailment
from trainables.evaluation.entailment_eval import run_entailment_attack
from trainables.evaluation.examples import changed_words
from trainables.evaluation.gradcam import gradcam_map, heat_overlay
from trainables.names import CLEAN, eps_fraction
from trainables.seeds import EXAMPLES, derive_seed


@dataclass(frozen=True)
class Panel:
    """One cell of the figure: one pair under one attack on one encoder.

    ``picture``: (3, H, W) the scored image with its GradCAM map drawn over it; ``heat``: (H, W) the map
    itself; ``hypothesis``: as
    scored (the attack's, for text attacks) with ``changed`` the indices of replaced words;
    ``predicted``: the class the model chose; ``p_true``: its probability of the true class.
    """

    encoder: str
    pair: int
    attack: str
    eps: float | None
    picture: torch.Tensor
    heat: torch.Tensor
    hypothesis: str
    changed: list[int]
    label: int
    predicted: int
    p_true: float


def entailment_panels(models: dict[str, object], dataset, indices: list[int], attacks: tuple[str, ...], eps: float,
                      seed: int = 0, candidates=None) -> list[Panel]:
    """Panels for ``dataset[indices]`` clean and under each attack, for each named model (attacked white-box).

    Every model must be an ALBEF/TCL VE model (``entailment_cross_attention``); models' modes are restored.
    """
    batch = collate_entailment([dataset[i] for i in indices])
    panels = []
    for encoder, model in models.items():
        device = model.pixel_mean.device
        images = batch.images.to(device)
        with eval_mode(model):
            for run_index, attack in enumerate((CLEAN,) + tuple(attacks)):
                if attack == CLEAN:
                    scored, hypotheses = images, list(batch.hypotheses)
                else:
                    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, EXAMPLES, run_index))
                    scored, hypotheses, _ = run_entailment_attack(attack, model, batch, images, eps, generator, candidates,
                                                                  dataset, indices)
                    scored = scored.detach()
                scores, attention, mask = model.entailment_cross_attention(scored, hypotheses, batch.labels)
                maps = gradcam_map(scores, attention, mask, image_size=tuple(scored.shape[-2:]))
                pictures = heat_overlay(scored, maps).cpu()
                with torch.no_grad():
                    probabilities = model.entailment_logits(scored, hypotheses).float().softmax(dim=-1).cpu()
                for b, label in enumerate(batch.labels.tolist()):
                    panels.append(Panel(encoder=encoder, pair=b, attack=attack, eps=None if attack == CLEAN else eps,
                                        picture=pictures[b], heat=maps[b].detach().cpu(), hypothesis=hypotheses[b],
                                        changed=changed_words(batch.hypotheses[b], hypotheses[b]), label=label,
                                        predicted=int(probabilities[b].argmax()), p_true=float(probabilities[b, label])))
    return panels


def map_agreement(panels: list[Panel], reference: str) -> dict[tuple[str, str], list[float]]:
    """Per (encoder, attack): the Pearson correlation of each pair's map with ``reference``'s *clean* map of that pair.

    How far an encoder (or an attack) moves where the model looks, as a number beside the
    pictures. A map without variation (no evidence anywhere) has no correlation and is left out.
    """
    clean = {p.pair: p.heat.flatten().clamp(min=0) for p in panels if p.encoder == reference and p.attack == CLEAN}
    found: dict[tuple[str, str], list[float]] = {}
    for panel in panels:
        if (panel.encoder, panel.attack) == (reference, CLEAN) or panel.pair not in clean:
            continue
        a, b = panel.heat.flatten().clamp(min=0), clean[panel.pair]
        if float(a.std()) == 0 or float(b.std()) == 0:
            continue
        found.setdefault((panel.encoder, panel.attack), []).append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return found


def marked_words(text: str, changed: list[int], width: int = 28) -> str:
    """``text`` with the words at ``changed`` in capitals (matplotlib text has no highlight), wrapped at ``width``."""
    words = [w.upper() if i in changed else w for i, w in enumerate(text.split())]
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def draw_panels(panels: list[Panel], title: str) -> Figure:
    """A grid: one row per pair × attack, one column per encoder; each cell the map, the hypothesis and the decision."""
    encoders = list(dict.fromkeys(p.encoder for p in panels))
    rows = list(dict.fromkeys((p.pair, p.attack) for p in panels))
    cell = {(p.pair, p.attack, p.encoder): p for p in panels}
    width, height = 2.5 * len(encoders) + 0.9, 2.9 * len(rows) + 0.8
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=10, y=1 - 0.2 / height)
    grid = figure.add_gridspec(len(rows), len(encoders), hspace=0.8, wspace=0.25, left=0.7 / width, right=1 - 0.1 / width,
                               top=1 - 0.6 / height, bottom=0.6 / height)
    for r, (pair, attack) in enumerate(rows):
        for c, encoder in enumerate(encoders):
            panel = cell.get((pair, attack, encoder))
            axes = figure.add_subplot(grid[r, c])
            axes.set_xticks([])
            axes.set_yticks([])
            if panel is None:
                axes.set_axis_off()
                continue
            axes.imshow(panel.picture.permute(1, 2, 0).numpy(), interpolation="nearest")
            if r == 0:
                axes.set_title(encoder, fontsize=9, fontweight="bold")
            if c == 0:
                label = attack if panel.eps is None else f"{attack} {eps_fraction(panel.eps)}"
                axes.set_ylabel(f"pair {pair}\n{label}", fontsize=8)
            verdict = "right" if panel.predicted == panel.label else f"wrong: {LABEL_NAMES[panel.predicted]}"
            axes.set_xlabel(f"{marked_words(panel.hypothesis, panel.changed)}\n{verdict}\np({LABEL_NAMES[panel.label]}) = {panel.p_true:.2f}",
                            fontsize=6.5, color="#1a7f37" if panel.predicted == panel.label else "#b42318")
    return figure


def only_indices(dataset, count: int, label: int | None = None) -> list[int]:
    """The first ``count`` indices of pairs with ``label`` (None: any), in dataset order."""
    found = []
    for index in range(len(dataset)):
        if label is None or dataset[index].label == label:
            found.append(index)
            if len(found) == count:
                break
    return found
