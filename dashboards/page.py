"""One self-contained HTML page: inline CSS, PNG figures embedded as base64, no script, no network.

Every string that comes from MLflow (names, params, URIs) is escaped: run names
and tags are user-controlled text.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from html import escape

from platform.seed_spread import cell_text
from trainables.names import CLEAN

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1em; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; text-align: center; }
td.text { text-align: left; } td.path { text-align: left; font-family: monospace; font-size: 11px; white-space: normal; word-break: break-all; }
td.best { font-weight: bold; background: #e6f4e6; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { font-size: 12px; color: #555; }
.group-note { font-weight: normal; font-size: 11px; color: #555; white-space: normal; }
.reason { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; font-size: 13px; }
nav a { margin-right: 14px; } code { font-size: 12px; }
"""


# Column labels of the caption metrics, as the COCO caption evaluation and the paper print them.
CAPTION_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                  "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE"}


@dataclass(frozen=True)
class FigureFile:
    """A rendered figure: embedded in the page and written as ``<name>.png`` beside it."""

    name: str  # file stem, [a-z0-9-] only
    title: str
    png: bytes


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "figure"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_html(figure: FigureFile, caption: str = "") -> str:
    return (f'<figure id="fig-{escape(figure.name)}"><img alt="{escape(figure.title)}" src="{data_uri(figure.png)}">'
            f"<figcaption>{escape(caption or figure.title)} (<code>{escape(figure.name)}.png</code>)</figcaption></figure>")


def cell(value: object) -> str:
    """Recall, caption scores (x100) and other floats to one decimal, as the paper prints them; missing values as a dash."""
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


def best_values(columns: list[str], rows: list[dict]) -> dict[str, float]:
    """The highest value of each column (recall and caption metrics: higher is better)."""
    best = {}
    for column in columns:
        values = [row[column] for row in rows if isinstance(row.get(column), (int, float))]
        if values:
            best[column] = max(values)
    return best


def metric_header(metric_columns: list[str], group_notes: dict[str, str] | None = None) -> tuple[str, str]:
    """Two header rows, paper style: ``clean`` / ``pgd eps4`` spanning their ``TR@1 IR@1`` (or ``BLEU-4 ... CIDEr``) columns.

    ``group_notes`` maps a group's prefix (``pgd/eps4``) to a line printed under its label: its threat model and scoring.
    """
    group_notes = group_notes or {}
    groups: list[tuple[str, list[str]]] = []
    for column in metric_columns:
        prefix, key = column.rsplit("/", 1)
        if groups and groups[-1][0] == prefix:
            groups[-1][1].append(key)
        else:
            groups.append((prefix, [key]))
    top = "".join(f'<th colspan="{len(keys)}">{escape(_attack_label(prefix))}{_group_note(group_notes.get(prefix))}</th>'
                  for prefix, keys in groups)
    bottom = "".join(f"<th>{escape(_key_label(key))}</th>" for _, keys in groups for key in keys)
    return top, bottom


def _group_note(note: str | None) -> str:
    return f'<br><span class="group-note">{escape(note)}</span>' if note else ""


def _key_label(key: str) -> str:
    if key in CAPTION_LABELS:
        return CAPTION_LABELS[key]
    return f"{key.upper()[:2]}@{key[2:]}"  # tr1 -> TR@1


def _attack_label(prefix: str) -> str:
    if prefix == CLEAN:
        return CLEAN
    attack, _, eps = prefix.partition("/eps")
    return f"{attack} eps {eps}/255"


def paper_table_html(text_columns: list[str], metric_columns: list[str], tail_columns: list[str], rows: list[dict],
                     group_notes: dict[str, str] | None = None) -> str:
    """Rows model × defense × eps; the best mean of each metric column in bold (class ``best``); ``group_notes``: see metric_header.

    A metric cell reads ``mean ± std [low, high]`` when the row has a ``spread`` for it
    (``platform.seed_spread``: the seeds' standard deviation, the bootstrap 95% interval over test images).
    """
    best = best_values(metric_columns, rows)
    top, bottom = metric_header(metric_columns, group_notes)
    head = "".join(f'<th rowspan="2">{escape(c)}</th>' for c in text_columns)
    tail = "".join(f'<th rowspan="2">{escape(c)}</th>' for c in tail_columns)
    lines = [f'<table class="paper"><thead><tr>{head}{top}{tail}</tr><tr>{bottom}</tr></thead><tbody>']
    for row in rows:
        cells = [f'<td class="text">{escape(cell(row.get(c)))}</td>' for c in text_columns]
        for column in metric_columns:
            mark = ' class="best"' if column in best and row.get(column) == best[column] else ""
            text = cell_text(row.get(column), row.get("spread", {}).get(column))  # mean ± std [bootstrap 95%]
            cells.append(f'<td data-column="{escape(column)}"{mark}>{escape(text)}</td>')
        cells += [f'<td class="path">{escape(cell(row.get(c)))}</td>' for c in tail_columns]
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def plain_table_html(columns: list[str], rows: list[dict], css_class: str, path_columns: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            kind = "path" if column in path_columns else ("text" if not isinstance(value, (int, float)) else "")
            cells.append(f'<td class="{kind}">{escape(cell(value))}</td>' if kind else f"<td>{escape(cell(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>' + "\n".join(body) + "</tbody></table>"


def document(title: str, sections: list[tuple[str, str, str]], meta: list[str]) -> str:
    """The whole document; ``sections`` are (anchor, heading, inner HTML)."""
    nav = "".join(f'<a href="#{escape(anchor)}">{escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{escape(anchor)}"><h2>{escape(heading)}</h2>\n{inner}\n</section>' for anchor, heading, inner in sections)
    meta_html = "".join(f"<div class='note'>{escape(line)}</div>" for line in meta)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{escape(title)}</h1>{meta_html}<nav>{nav}</nav>\n{body}\n</body></html>\n")


def reason_html(text: str) -> str:
    return f'<p class="reason">{escape(text)}</p>'


def subheading_html(text: str) -> str:
    return f"<h3>{escape(text)}</h3>"


def note_html(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'
