"""How fast is one MAVA training step, against the authors' step, a naive step and the floor?

    python benchmarks/mava_step.py [--json OUT] [--repeats 5] [--model tiny-clip] [--no-scaling]

On the same model and the same batch of B distinct images (paper settings: K = 10 PGD
steps, N = 3 neighbours, M = 5 captions, batch 32), it times, interleaved and after warm-up:

- ``mava``: ``trainables.steps.mava_step`` as ``run_training`` uses it (cached caption
  features and ``F_org``, the encoders of ``make_encoders``) + backward + optimiser step;
- ``authors``: ``benchmarks/authors_mava.py``, the authors' released CLIP step (every
  image repeated M times, ``F_org`` and captions encoded every step, ``pgd_2``'s
  look-ahead and (N+1)-iterate average) + backward + optimiser step;
- ``naive``: ``benchmarks/naive_mava.py`` (frozen features recomputed every step,
  PGD with ``loss.backward()``, one view at a time) + backward + optimiser step;
- ``floor``: only the encoder passes any MAVA step needs: K input-gradient passes of
  the vision encoder on B images, one forward/backward over the (N+1)*B views, and
  the optimiser step (no loss arithmetic, projection or random draws);
- ``fare`` and ``tecoa``: their steps (``trainables.steps``), same encoders and batch;
  ``fare_authors``: ``benchmarks/robustvlm_fare.py``, RobustVLM's FARE step;
  ``floor_fare``: the encoder passes any FARE or TeCoA step needs (K input-gradient
  passes on B images, one forward/backward over B views, the optimiser step).

It prints and writes ``speedup_vs_authors = t_authors / t_mava`` (and the same for
FARE), ``speedup_vs_naive = t_naive / t_mava`` and ``efficiency_vs_floor`` of the MAVA,
FARE and TeCoA steps (medians), each beside its FLOP ratio, images/s, the step's FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions and attention, forward and
backward) and, on a GPU of the ``PEAK_TFLOPS`` table (or with ``--peak-tflops``),
the model FLOP utilisation. With ``--scaling`` (default) it adds how the optimised
step's time grows with K, N and M, one at a time around the paper's point
(``--scaling-K 1,5,10 --scaling-N 1,3,6 --scaling-M 1,5``).

On a CUDA device the default model is open_clip ViT-B-16 at 224 px with random
weights (``open_clip.create_model('ViT-B-16', pretrained=None)``: nothing is
downloaded); on CPU it is the embedded ``tiny-clip``. BENCHMARKS.md has the numbers.
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
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.authors_mava import authors_mava_step, end_of_step  # noqa: E402
from benchmarks.common import hardware, summary, time_interleaved, write_json  # noqa: E402
from benchmarks.naive_mava import naive_mava_step  # noqa: E402
from benchmarks.robustvlm_fare import robustvlm_fare_step  # noqa: E402
from trainables.config import Precision, TrainConfig  # noqa: E402
from trainables.data.synthetic import SyntheticWorld  # noqa: E402
from trainables.models.base import VLPModel  # noqa: E402
from trainables.steps import fare_step, make_encoders, mava_step, step_precision, tecoa_step  # noqa: E402
from trainables.train import build_optimizer, frozen_features, resolve_device  # noqa: E402

TARGETS = {"speedup_vs_authors": 4.0, "efficiency_vs_floor": 1.05}  # issue 19 (issue 7's speedup_vs_naive >= 2 withdrawn)
# Variants timed in every run, in this (interleaving) order; FLOPs are also counted for the
# authors' steps with backward() in PGD (the issue's reading), which are not timed.
VARIANTS = ("mava", "authors", "naive", "floor", "fare", "fare_authors", "tecoa", "floor_fare")
COUNTED_ONLY = ("authors_backward", "fare_authors_backward")
# (step, its baseline or floor): the ratios the benchmark reports, each from time and from FLOPs.
SPEEDUPS = {"speedup_vs_authors": ("mava", "authors"), "speedup_vs_authors_fare": ("fare", "fare_authors"),
            "speedup_vs_naive": ("mava", "naive")}
FLOORS = {"mava": "floor", "fare": "floor_fare", "tecoa": "floor_fare"}
RANDOM_VIT = "vit-b-16-random"  # open_clip ViT-B-16, 224 px, random weights (the GPU benchmark)

# Dense peak TFLOP/s per GPU from the vendors' data sheets (no sparsity), keyed by a substring
# of torch.cuda.get_device_name(); more specific names first. "fp32" is the non-tensor-core
# peak: PyTorch's default float32 matmul precision ("highest") does not use TF32.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Attention on CPU runs kernels the flop counter has no formula for; they compute what the GPU ones do.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def peak_tflops(device_name: str, precision: Precision) -> float | None:
    """The table's dense peak for this device and precision, or None when the device is not in it."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks[precision.value]
    return None


def model_flop_utilisation(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the device's peak (``peak`` in TFLOP/s); None without a peak."""
    if peak is None:
        return None
    return flops_per_step / seconds_per_step / (peak * 1e12)


def count_flops(function: Callable[[], None]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention; forward and backward), by torch's flop counter.

    Two kernels are invisible to the counter as shipped: ``nn.MultiheadAttention``'s fused
    inference path (taken under ``no_grad`` in eval mode, e.g. by the frozen encoders),
    switched off while counting so the same arithmetic runs through ops the counter
    knows, and the CPU flash-attention kernels, counted with the formula torch uses for
    the GPU ones.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            function()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def peak_memory_bytes(function: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during one call (None on CPU, where torch keeps no such count)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def load_benchmark_model(spec: str) -> VLPModel:
    """``vit-b-16-random`` (built, never downloaded) or any model spec of ``trainables.models.load_model``."""
    if spec == RANDOM_VIT:
        import open_clip

        from trainables.models.open_clip_model import build_open_clip

        torch.manual_seed(0)
        return build_open_clip(open_clip.create_model("ViT-B-16", pretrained=None), "open_clip:ViT-B-16 (random weights)").eval()
    from trainables.models import load_model

    return load_model(spec)


@dataclass
class Workload:
    """One model, one batch and its frozen features, shared by every variant."""

    model: VLPModel
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    captions: list[tuple[str, ...]]
    caption_features: torch.Tensor  # (B, 5, D): the first 5 captions; a step uses the first M
    original_features: torch.Tensor  # (B, D) = F_org(images)
    device: torch.device


def build_workload(model: VLPModel, batch: int, device: torch.device) -> Workload:
    """The batch: the first ``batch`` images of the synthetic train split at the model's size."""
    model = model.to(device)
    model.freeze_text()
    world = SyntheticWorld("train", batch, image_size=model.image_size, seed=0)
    cache = frozen_features(model, world, 5, batch, device)  # exactly the training loop's cache
    ids = [world.item_id(i) for i in range(batch)]
    return Workload(
        model=model,
        images=torch.stack([world[i].image for i in range(batch)]).to(device),
        captions=[world[i].captions for i in range(batch)],
        caption_features=torch.stack([cache[i][0] for i in ids]),
        original_features=torch.stack([cache[i][1] for i in ids]),
        device=device,
    )


def step_functions(work: Workload, config: TrainConfig) -> dict[str, Callable[[], None]]:
    """One full training step per variant (attack, forward, loss, backward, optimiser step)."""
    model, device = work.model, work.device
    attack, train = make_encoders(model.vision, model.vision, model.normalize, config)
    captions = work.caption_features[:, : config.M]
    optimizers = {name: build_optimizer(config, model.vision.parameters()) for name in VARIANTS + COUNTED_ONLY}
    # Every variant steps the same encoder, round after round. At lr 0 the optimiser still does all of its
    # arithmetic but the weights stay where they started, so every round times the same work on the same
    # weights; with a real lr, dozens of steps on one batch drove a random ViT-B to a NaN loss (bf16, batch 128, H200).
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = 0.0

    def generator() -> torch.Generator:  # the same draws at every call: every repeat does the same work
        return torch.Generator(device=device).manual_seed(config.seed)

    def update(name: str, terms: dict[str, torch.Tensor]) -> None:
        # What run_training does after the step: finiteness check, backward, step, term bookkeeping.
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: the loss became {loss.item()}")
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()
        {key: value.item() for key, value in terms.items()}  # the loop's per-term totals (a device sync)

    def optimised(step, name: str, **extra) -> Callable[[], None]:
        def run() -> None:
            model.vision.train()
            with step_precision(config, device):
                terms = step(attack, train, work.images, captions, work.original_features, config, generator(), **extra)
            update(name, terms)
        return run

    def naive() -> None:
        model.vision.train()
        with step_precision(config, device):
            terms = naive_mava_step(model, work.images, work.captions, config, generator())
        update("naive", terms)

    def authors(name: str, pgd_gradient: str) -> Callable[[], None]:
        def run() -> None:
            model.vision.train()
            with step_precision(config, device):
                terms = authors_mava_step(model, work.images, work.captions, config, pgd_gradient=pgd_gradient)
            update(name, terms)
            end_of_step(device)
        return run

    def fare_authors(name: str, pgd_gradient: str) -> Callable[[], None]:
        def run() -> None:
            model.vision.train()
            with step_precision(config, device):
                terms = robustvlm_fare_step(model, work.images, config, generator(), pgd_gradient=pgd_gradient)
            update(name, terms)
            end_of_step(device)
        return run

    vision = torch.compile(model.vision) if config.compile else model.vision
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    images = work.images.contiguous(memory_format=layout)
    views = torch.cat([work.images] * (config.N + 1)).contiguous(memory_format=layout)

    def floor(name: str, outer_views: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            model.vision.train()
            with step_precision(config, device):
                model.vision.requires_grad_(False)  # input gradients only (also what a compiled graph then traces)
                for _ in range(config.pgd_steps):  # K input-gradient passes on B images
                    pixels = images.detach().requires_grad_(True)
                    torch.autograd.grad(vision(model.normalize(pixels)).float().sum(), pixels)
                model.vision.requires_grad_(True)
                loss = vision(model.normalize(outer_views)).float().sum()  # one forward over the outer step's views
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return run

    functions = {
        "mava": optimised(mava_step, "mava"),
        "authors": authors("authors", "autograd"),
        "naive": naive,
        "floor": floor("floor", views),  # the (N+1)*B views of MAVA
        "fare": optimised(fare_step, "fare"),
        "fare_authors": fare_authors("fare_authors", "autograd"),
        "tecoa": optimised(tecoa_step, "tecoa", logit_scale=model.logit_scale),
        "floor_fare": floor("floor_fare", images),  # the B adversarial views of FARE and TeCoA
        "authors_backward": authors("authors_backward", "backward"),
        "fare_authors_backward": fare_authors("fare_authors_backward", "backward"),
    }
    assert tuple(functions) == VARIANTS + COUNTED_ONLY
    return functions


def scaling_points(centre: tuple[int, int, int], ks: list[int], ns: list[int], ms: list[int]) -> list[tuple[int, int, int]]:
    """(K, N, M) points: the centre, then each of K, N and M varied alone over its values."""
    k0, n0, m0 = centre
    points = [centre] + [(k, n0, m0) for k in ks] + [(k0, n, m0) for n in ns] + [(k0, n0, m) for m in ms]
    return list(dict.fromkeys(points))  # keep the order, drop repeats of the centre point


def scaling_table(work: Workload, base: TrainConfig, ks: list[int], ns: list[int], ms: list[int], repeats: int,
                  warmup: int) -> list[dict[str, float]]:
    """Median seconds of the optimised MAVA step at each (K, N, M), interleaved like the main comparison.

    ``passes`` is the encoder work in forward-pass units (an input-gradient pass ~ 2, a
    forward/backward with weight gradients ~ 3): ``2K + 3(N+1)``; ``relative`` compares the
    measured time with the paper's point, ``passes_relative`` what the pass count predicts.
    """
    points = scaling_points((base.pgd_steps, base.N, base.M), ks, ns, ms)
    functions = {}
    for k, n, m in points:
        config = base.model_copy(update={"pgd_steps": k, "N": n, "M": m})
        functions[(k, n, m)] = step_functions(work, config)["mava"]
    times, cpu_times = time_interleaved(functions, repeats, warmup, work.device)
    centre = statistics.median(times[(base.pgd_steps, base.N, base.M)])
    cpu_centre = statistics.median(cpu_times[(base.pgd_steps, base.N, base.M)])
    centre_passes = 2 * base.pgd_steps + 3 * (base.N + 1)
    rows = []
    for (k, n, m), seconds in times.items():
        median = statistics.median(seconds)
        passes = 2 * k + 3 * (n + 1)
        cpu_median = statistics.median(cpu_times[(k, n, m)])
        rows.append({"K": k, "N": n, "M": m, "seconds": median, "relative": median / centre,
                     "cpu_seconds": cpu_median, "cpu_relative": cpu_median / cpu_centre,
                     "passes": passes, "passes_relative": passes / centre_passes})
    return rows


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = args.model if args.model != "auto" else (RANDOM_VIT if device.type == "cuda" else "tiny-clip")
    config = TrainConfig(model=spec, batch_size=args.batch, pgd_steps=args.pgd_steps,
                         N=args.N, M=args.M, precision=args.precision, compile=args.compile, channels_last=args.channels_last,
                         device=str(device))
    model = load_benchmark_model(spec)
    if config.channels_last:
        model.vision.to(memory_format=torch.channels_last)
    work = build_workload(model, args.batch, device)
    every = step_functions(work, config)
    functions = {name: every[name] for name in VARIANTS}
    print(f"model {model.spec} at {model.image_size} px on {device}; B={args.batch} K={config.pgd_steps} N={config.N} M={config.M} "
          f"precision={config.precision.value} compile={config.compile} channels_last={config.channels_last}; "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up round(s)", flush=True)
    load_at_start = os.getloadavg()[0]
    # Warm-up rounds, timed apart: their first calls include torch.compile's compilation.
    warmup_times, _ = time_interleaved(functions, args.warmup, 0, device)
    times, cpu_times = time_interleaved(functions, args.repeats, 0, device)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    cpu_medians = {name: statistics.median(seconds) for name, seconds in cpu_times.items()}
    peak_memory = {name: peak_memory_bytes(function, device) for name, function in functions.items()}
    # FLOPs of one call each, counted outside the timed runs (the counter slows the step down) and
    # in eager mode (the count is a property of the mathematics, not of compilation).
    eager = step_functions(work, config.model_copy(update={"compile": False})) if config.compile else every
    flops = {name: count_flops(eager[name]) for name in VARIANTS + COUNTED_ONLY}
    peak = args.peak_tflops if args.peak_tflops is not None else (
        peak_tflops(torch.cuda.get_device_name(device), config.precision) if device.type == "cuda" else None)
    result = {
        "benchmark": "mava_step",
        "settings": {"model": model.spec, "image_size": model.image_size, "device": str(device), "batch": args.batch,
                     "K": config.pgd_steps, "N": config.N, "M": config.M, "precision": config.precision.value,
                     "compile": config.compile, "channels_last": config.channels_last, "repeats": args.repeats, "warmup": args.warmup},
        "hardware": {**hardware(device), "load_average_1min_at_start": load_at_start},
        "seconds": {name: summary(seconds) for name, seconds in times.items()},
        "cpu_seconds": {name: summary(seconds) for name, seconds in cpu_times.items()},
        "warmup_seconds": {name: sum(seconds) for name, seconds in warmup_times.items()},
        "peak_memory_bytes": peak_memory,
        "images_per_second": args.batch / medians["mava"],
        "flops_per_step": flops,
        "achieved_tflops": flops["mava"] / medians["mava"] / 1e12,
        "peak_tflops": peak,
        "mfu": model_flop_utilisation(flops["mava"], medians["mava"], peak),
        "targets": TARGETS,
    }
    # Each ratio from wall time, from process CPU time (steadier on a busy, shared CPU) and from FLOPs.
    for key, (step, baseline) in SPEEDUPS.items():
        result[key] = medians[baseline] / medians[step]
        result[f"{key}_cpu_time"] = cpu_medians[baseline] / cpu_medians[step]
        result[f"{key}_flops"] = flops[baseline] / flops[step]
    result["speedup_vs_authors_backward_flops"] = flops["authors_backward"] / flops["mava"]
    result["speedup_vs_authors_fare_backward_flops"] = flops["fare_authors_backward"] / flops["fare"]
    result["efficiency_vs_floor_by_step"] = {step: medians[step] / medians[floor] for step, floor in FLOORS.items()}
    result["efficiency_vs_floor_by_step_cpu_time"] = {step: cpu_medians[step] / cpu_medians[floor] for step, floor in FLOORS.items()}
    result["flops_vs_floor_by_step"] = {step: flops[step] / flops[floor] for step, floor in FLOORS.items()}
    result["efficiency_vs_floor"] = result["efficiency_vs_floor_by_step"]["mava"]
    result["efficiency_vs_floor_cpu_time"] = result["efficiency_vs_floor_by_step_cpu_time"]["mava"]
    if args.scaling:
        result["scaling"] = scaling_table(work, config, args.scaling_K, args.scaling_N, args.scaling_M, args.scaling_repeats, args.warmup)
    return result


def report(result: dict) -> str:
    """The human-readable summary (also what BENCHMARKS.md quotes)."""
    lines = ["step      wall s: median   min       max       | process CPU s: median   min"]
    for name, row in result["seconds"].items():
        cpu = result["cpu_seconds"][name]
        lines.append(f"{name:<9} {row['median']:<16.4f} {row['min']:<9.4f} {row['max']:<9.4f} | {cpu['median']:<22.4f} {cpu['min']:.4f}")
    flops = result["flops_per_step"]
    lines += ["warm-up rounds (incl. any compilation), s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["warmup_seconds"].items()),
              "ratio (medians)                       wall     CPU time  FLOPs"]
    for key, (step, baseline) in SPEEDUPS.items():
        target = f"  (target >= {TARGETS[key]})" if key in TARGETS else ""
        lines.append(f"{key + f' = t_{baseline} / t_{step}':<37} {result[key]:<8.2f} {result[key + '_cpu_time']:<9.2f} "
                     f"{result[key + '_flops']:.2f}{target}")
    for step, floor in FLOORS.items():
        lines.append(f"{f'efficiency_vs_floor[{step}] = t_{step} / t_{floor}':<37} {result['efficiency_vs_floor_by_step'][step]:<8.3f} "
                     f"{result['efficiency_vs_floor_by_step_cpu_time'][step]:<9.3f} {result['flops_vs_floor_by_step'][step]:.3f}"
                     f"  (target <= {TARGETS['efficiency_vs_floor']})")
    lines += [
        f"with backward() in PGD (the issue's reading, FLOPs only): authors / mava {result['speedup_vs_authors_backward_flops']:.2f}, "
        f"fare_authors / fare {result['speedup_vs_authors_fare_backward_flops']:.2f}",
        f"images/s (mava step) = {result['images_per_second']:.1f}",
        "GFLOP per step: " + ", ".join(f"{name} {value / 1e9:.1f}" for name, value in flops.items()),
        f"achieved {result['achieved_tflops']:.3f} TFLOP/s (mava step)",
        "MFU: " + (f"{result['mfu']:.1%} of {result['peak_tflops']} TFLOP/s peak" if result["mfu"] is not None
                   else "n/a (no peak known for this device: pass --peak-tflops)"),
    ]
    if result["peak_memory_bytes"]["mava"] is not None:
        lines.append("peak memory, GiB: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in result["peak_memory_bytes"].items()))
    if "scaling" in result:
        lines += ["", "scaling of the mava step (one of K, N, M varied around the paper's point)",
                  " K   N   M   wall s     relative   CPU s      relative   2K+3(N+1) passes   passes relative"]
        for row in result["scaling"]:
            lines.append(f"{row['K']:>2}  {row['N']:>2}  {row['M']:>2}   {row['seconds']:<10.4f} {row['relative']:<10.2f} "
                         f"{row['cpu_seconds']:<10.4f} {row['cpu_relative']:<10.2f} {row['passes']:<18} {row['passes_relative']:.2f}")
    return "\n".join(lines)


def _integers(text: str) -> list[int]:
    values = [int(part) for part in text.split(",")]
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--model", default="auto", help=f"model spec, or {RANDOM_VIT}; auto = {RANDOM_VIT} on CUDA, tiny-clip on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pgd-steps", type=int, default=10, help="K")
    parser.add_argument("--N", type=int, default=3, help="neighbours")
    parser.add_argument("--M", type=int, default=5, help="captions per image (<= 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True, help="add the K/N/M scaling table")
    parser.add_argument("--scaling-repeats", type=int, default=3)
    parser.add_argument("--scaling-K", type=_integers, default=[1, 5, 10], help="K values of the scaling table (comma-separated)")
    parser.add_argument("--scaling-N", type=_integers, default=[1, 3, 6], help="N values of the scaling table")
    parser.add_argument("--scaling-M", type=_integers, default=[1, 5], help="M values of the scaling table (<= 5)")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders (also measurable on CPU here)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice, one per core)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of the device for the MFU (default: the built-in GPU table)")
    args = parser.parse_args(argv)
    if not all(1 <= m <= 5 for m in [args.M, *args.scaling_M]):
        parser.error("M must be between 1 and 5 (the synthetic world has 5 captions per image)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
