"""What does each evaluation attack cost, against the encoder passes its algorithm needs?

    python benchmarks/evaluate_attacks.py [--json OUT] [--images 16] [--eps 4/255] [--attacks pgd,apgd,...] [--threads 1]

On one batch of the synthetic test split (default 16 images, 5 captions each) and one
eps, it runs every attack of ``trainables.attacks.ATTACKS`` that is asked for (default
the embedded default's table: PGD, APGD, Co-attack, SGA, VLP-attack) with the model's
``encode_image`` and ``encode_text`` instrumented, and reports per attack:

- **seconds per image** of the attack call (median of ``--repeats``), and the
  seconds spent inside ``encode_text`` (the **text share**). Seconds are process CPU
  seconds on a CPU (on a shared 2-core machine wall time mostly measures waiting for a
  core; run with ``--threads 1`` so CPU time is the work done) and wall seconds on a
  GPU; the attack's wall seconds are recorded too;
- the **encoder-pass floor**: the time of the passes the algorithm needs, each timed
  alone on this model at the batch size the attack uses:

  * image side, from the algorithm's settings (``IMAGE_PASSES``): K steps x copies or
    views input-gradient passes (APGD: K + 1, its start point is scored too), plus the
    clean forwards it needs (SGA: clean and adversarial features for its two text
    stages; VLP-attack: the clean image and its 7 clean views);
  * text side: encoding every *distinct* text the attack encodes once (captions,
    captions with a word blanked out, candidate captions), in batches of 512 as the
    attacks do; encoding a text twice is waste, not floor;

- ``efficiency_vs_floor = t_attack / t_floor`` and the image/text passes the attack
  actually made beside the needed ones. (``image_encoder_seconds`` times the forwards
  inside ``encode_image`` only: an attack's backward runs later, in ``autograd.grad``.)

Everything outside the encoders (candidate generation, projections, the loss, Python
bookkeeping) is overhead by this definition. BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `trainables` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Iterator  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import hardware, synchronize, write_json  # noqa: E402
from trainables.attacks import ATTACKS  # noqa: E402
from trainables.attacks.base import frozen_eval  # noqa: E402
from trainables.data.synthetic import SyntheticWorld  # noqa: E402
from trainables.config import parse_eps  # noqa: E402

DEFAULT_ATTACKS = ("pgd", "apgd", "co-attack", "sga", "vlp-attack")
TARGET = 1.3  # issue 19: every attack within 1.3x its floor
TEXT_BATCH = 512  # TextAttackSettings.batch_size, the attacks' encode_text chunk


def image_passes(name: str, batch: int) -> list[tuple[str, int, int]]:
    """``(kind, images per pass, passes)`` the attack's algorithm needs; kind ``grad`` (input gradient) or ``forward``.

    Defaults of each attack (trainables.attacks): 10 steps; APGD 100 steps plus its start
    point; SGA 1 + 4 scaled copies; VLP-attack 7 views.
    """
    table = {
        "pgd": [("grad", batch, 10)],
        "apgd": [("grad", batch, 101)],
        "apgd-ce": [("grad", batch, 101)],
        "co-attack": [("forward", batch, 1), ("grad", batch, 10)],
        "sga": [("forward", batch, 2), ("grad", 5 * batch, 10)],
        "vlp-attack": [("forward", batch, 1), ("forward", 7 * batch, 1), ("grad", 7 * batch, 10)],
    }
    return table[name]


@dataclass
class Calls:
    """What the instrumented encoders saw during one attack call."""

    image: list[tuple[str, int]] = field(default_factory=list)  # (kind, images)
    texts: list[str] = field(default_factory=list)
    text_seconds: float = 0.0  # process CPU seconds inside encode_text
    image_seconds: float = 0.0


@contextmanager
def instrumented(model, device: torch.device) -> Iterator[Calls]:
    """Count (and time) every ``encode_image`` / ``encode_text`` call of ``model`` while inside."""
    calls = Calls()
    encode_image, encode_text = model.encode_image, model.encode_text

    def counting_image(pixels: torch.Tensor) -> torch.Tensor:
        kind = "grad" if torch.is_grad_enabled() and pixels.requires_grad else "forward"
        calls.image.append((kind, len(pixels)))
        synchronize(device)
        started = clock(device)
        out = encode_image(pixels)
        synchronize(device)
        calls.image_seconds += clock(device) - started
        return out

    def counting_text(texts: list[str]) -> torch.Tensor:
        calls.texts.extend(texts)
        synchronize(device)
        started = clock(device)
        out = encode_text(texts)
        synchronize(device)
        calls.text_seconds += clock(device) - started
        return out

    model.encode_image, model.encode_text = counting_image, counting_text  # instance attributes shadow the methods
    try:
        yield calls
    finally:
        del model.encode_image, model.encode_text


def clock(device: torch.device) -> float:
    """Process CPU seconds on a CPU (steady on a shared machine: waiting for a core does not count), wall seconds on a GPU."""
    return time.process_time() if device.type == "cpu" else time.perf_counter()


def _median_seconds(function, repeats: int, device: torch.device) -> float:
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = clock(device)
        function()
        synchronize(device)
        seconds.append(clock(device) - started)
    return statistics.median(seconds)


def image_pass_seconds(model, kind: str, count: int, size: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one encoder pass over ``count`` images: a forward, or a forward + input gradient."""
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        with torch.no_grad():
            model.encode_image(pixels)

    def gradient() -> None:
        probe = pixels.clone().requires_grad_(True)
        torch.autograd.grad(model.encode_image(probe).float().sum(), probe)

    with frozen_eval(model):
        return _median_seconds(forward if kind == "forward" else gradient, repeats, device)


def text_floor_seconds(model, texts: list[str], device: torch.device, repeats: int) -> float:
    """Median seconds to encode each distinct text once, in the attacks' chunks."""
    distinct = list(dict.fromkeys(texts))

    def encode() -> None:
        with torch.no_grad():
            for start in range(0, len(distinct), TEXT_BATCH):
                model.encode_text(distinct[start:start + TEXT_BATCH])

    return _median_seconds(encode, repeats, device) if distinct else 0.0


def measure_attack(model, name: str, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float, device: torch.device,
                   repeats: int, pass_cache: dict) -> dict:
    """Time one attack (median of ``repeats`` calls, same seed) and its floor; the passes it made and needed."""
    attack = ATTACKS[name]
    seconds, wall, text_seconds, image_seconds = [], [], [], []
    for _ in range(repeats):
        with instrumented(model, device) as calls:
            synchronize(device)
            started, wall_started = clock(device), time.perf_counter()
            attack(model, images, captions, eps, torch.Generator(device=device).manual_seed(0))
            synchronize(device)
            seconds.append(clock(device) - started)
            wall.append(time.perf_counter() - wall_started)
        text_seconds.append(calls.text_seconds)
        image_seconds.append(calls.image_seconds)
    needed = image_passes(name, len(images))
    image_floor = 0.0
    for kind, count, passes in needed:
        key = (kind, count)
        if key not in pass_cache:
            pass_cache[key] = image_pass_seconds(model, kind, count, images.shape[-1], device, repeats=3)
        image_floor += passes * pass_cache[key]
    text_floor = text_floor_seconds(model, calls.texts, device, repeats=max(1, min(repeats, 3)))
    attack_seconds = statistics.median(seconds)
    floor = image_floor + text_floor
    made = {}
    for kind, count in calls.image:
        made[f"{kind} x{count}"] = made.get(f"{kind} x{count}", 0) + 1
    return {
        "attack": name, "seconds": attack_seconds, "seconds_samples": seconds, "wall_seconds_samples": wall,
        "seconds_per_image": attack_seconds / len(images),
        "image_encoder_seconds": statistics.median(image_seconds), "text_encoder_seconds": statistics.median(text_seconds),
        "text_share": statistics.median(text_seconds) / attack_seconds,
        "floor_seconds": floor, "image_floor_seconds": image_floor, "text_floor_seconds": text_floor,
        "floor_seconds_per_image": floor / len(images), "text_share_of_floor": text_floor / floor if floor else 0.0,
        "efficiency_vs_floor": attack_seconds / floor,
        "image_passes_made": made, "image_passes_needed": {f"{kind} x{count}": passes for kind, count, passes in needed},
        "texts_encoded": len(calls.texts), "distinct_texts": len(set(calls.texts)),
    }


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainables.models import load_model
    from trainables.train import resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model).to(device).eval()
    world = SyntheticWorld("test", args.images, image_size=model.image_size, seed=0)
    images = torch.stack([world[i].image for i in range(args.images)]).to(device)
    captions = [world[i].captions for i in range(args.images)]
    print(f"model {model.spec} at {model.image_size} px on {device}; {args.images} images x {len(captions[0])} captions; "
          f"eps {args.eps}; median of {args.repeats} call(s) per attack", flush=True)
    load_at_start = os.getloadavg()[0]
    pass_cache: dict = {}
    rows = [measure_attack(model, name, images, captions, parse_eps(args.eps), device, args.repeats, pass_cache) for name in args.attacks]
    return {
        "benchmark": "evaluate_attacks",
        "settings": {"model": model.spec, "image_size": model.image_size, "device": str(device), "images": args.images,
                     "captions_per_image": len(captions[0]), "eps": args.eps, "repeats": args.repeats},
        "hardware": {**hardware(device), "load_average_1min_at_start": load_at_start},
        "attacks": rows,
        "target": TARGET,
    }


def report(result: dict) -> str:
    lines = ["attack       s/image   floor s/image  efficiency_vs_floor  text share (attack | floor)  texts encoded (distinct)  "
             "image passes made | needed"]
    for row in result["attacks"]:
        made = ", ".join(f"{k}: {v}" for k, v in row["image_passes_made"].items())
        needed = ", ".join(f"{k}: {v}" for k, v in row["image_passes_needed"].items())
        lines.append(f"{row['attack']:<12} {row['seconds_per_image']:<9.3f} {row['floor_seconds_per_image']:<14.3f} "
                     f"{row['efficiency_vs_floor']:<20.2f} {row['text_share']:>5.0%} | {row['text_share_of_floor']:<20.0%} "
                     f"{row['texts_encoded']} ({row['distinct_texts']}){'':<10} {made} | {needed}")
    lines.append(f"target: every attack <= {result['target']}x its floor")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--model", default="tiny-clip", help="model spec (default: the embedded tiny-clip)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--eps", default="4/255")
    parser.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help=f"comma-separated, of: {', '.join(ATTACKS)}")
    parser.add_argument("--repeats", type=int, default=1, help="calls per attack (median)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    args = parser.parse_args(argv)
    args.attacks = [name.strip() for name in args.attacks.split(",") if name.strip()]
    unknown = [name for name in args.attacks if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}: use {', '.join(ATTACKS)}")
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
