"""The adversarial examples of :mod:`trainables.evaluation.examples` as an HTML fragment or a whole page.

One block per test image: the clean image and its captions, then one row per attack ×
eps with, for each encoder side by side (undefended, fine-tuned), the adversarial
image, its perturbation amplified to the full grey range (grey = unchanged, see
:func:`~trainables.evaluation.examples.amplified`), and the top captions it retrieves
(a tick marks one of the image's own captions). Words a multimodal attack replaced are
highlighted in the attacked captions. For ALBEF/TCL models a third picture is the GradCAM
map of the image's first caption (bright = where the ITM logit's evidence lies). Pure string building: the caller says how an
image file is addressed (a relative file name in an artifact folder, a data URI in the
report).
"""

from __future__ import annotations

import html
from collections.abc import Callable

from trainables.evaluation.examples import Example

ENCODERS = ("undefended", "fine-tuned")
STYLE = """
.adv-examples { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
.adv-examples td, .adv-examples th { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; }
/* captions read left to right and wrap (the report's numeric tables right-align and never wrap) */
.adv-examples td { text-align: left; white-space: normal; min-width: 14em; }
.adv-examples img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.adv-examples ol { margin: 0; padding-left: 1.3em; }
.adv-examples .hit { color: #1a7f37; font-weight: 600; }
.adv-examples mark { background: #ffd33d; }
"""


def _top_html(top: list[tuple[str, bool]]) -> str:
    items = "".join(f'<li class="{"hit" if own else ""}">{"✓ " if own else ""}{html.escape(caption)}</li>' for caption, own in top)
    return f"<ol>{items}</ol>"


def _captions_html(example: Example) -> str:
    """The image's own captions as the attack left them, replaced words highlighted (only when a word changed)."""
    lines = []
    for caption, changed in zip(example.captions, example.changed):
        if changed:
            words = [f"<mark>{html.escape(w)}</mark>" if i in changed else html.escape(w) for i, w in enumerate(caption.split())]
            lines.append(" ".join(words))
    return ("<div><b>attacked captions</b><br>" + "<br>".join(lines) + "</div>") if lines else ""


def _cell(example: Example, src: Callable[[str], str]) -> str:
    images = f'<img src="{src(example.png)}" alt="{html.escape(example.png)}">'
    if example.delta_png:
        images += f'<img src="{src(example.delta_png)}" alt="perturbation ×{html.escape(str(example.eps))}">'
    if example.cam_png:
        images += f'<img src="{src(example.cam_png)}" alt="GradCAM" title="GradCAM of the ITM logit with the first caption">'
    caption = "" if example.delta_png is None else f"<div>‖δ‖∞ = {example.linf:g}/255</div>"
    return (f'<td><div style="display:flex;gap:4px">{images}</div>{caption}</td>'
            f"<td>{_top_html(example.top)}{_captions_html(example)}</td>")


def examples_fragment(examples: list[Example], src: Callable[[str], str]) -> str:
    """A table per test image: rows = clean and each attack × eps; column pairs = encoders."""
    encoders = [e for e in ENCODERS if any(x.encoder == e for x in examples)]
    blocks = []
    for image in sorted({x.image for x in examples}):
        rows = {}
        for example in (x for x in examples if x.image == image):
            rows.setdefault((example.attack, example.eps), {})[example.encoder] = example
        header = "".join(f'<th colspan="2">{html.escape(e)} encoder: image (and perturbation), top captions</th>' for e in encoders)
        body = []
        for (attack, eps), by_encoder in rows.items():
            label = attack if eps is None else f"{attack} {eps}"
            cells = "".join(_cell(by_encoder[e], src) if e in by_encoder else "<td></td><td></td>" for e in encoders)
            body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
        blocks.append(f'<table class="adv-examples"><caption>test image {image}</caption><tr><th></th>{header}</tr>'
                      + "".join(body) + "</table>")
    return "".join(blocks)


def examples_page(context: dict, examples: list[Example], src: Callable[[str], str] = lambda name: name) -> str:
    """A standalone page (the trial's ``examples/index.html`` artifact): the context, then the tables."""
    facts = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in context.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Adversarial examples</title><style>{STYLE}</style></head>"
            f"<body><h1>Adversarial examples</h1><ul>{facts}</ul>"
            "<p>Each encoder is attacked white-box. The perturbation is shown amplified: grey is unchanged, "
            "full black or white is ±eps. A tick marks a retrieved caption that belongs to the image. "
            "For fusion models (ALBEF, TCL) the last picture is GradCAM of the ITM logit with the image's first caption "
            "as the attack left it (dark: no evidence; bright: most evidence; each map scaled to its own maximum).</p>"
            f"{examples_fragment(examples, src)}</body></html>")
