"""The GPU measurement of issue 19 in one command, under 9 minutes on one GPU; writes one JSON.

    benchmarks/gpu_check.sh [--out gpu_check] [--budget-s 540] [--dry-run]

Steps, each a subprocess with its own time limit (and all within ``--budget-s``):

1. ``tests``: the ``gpu``-marked tests (``pytest -m gpu tests/test_gpu.py``): bf16, compile
   and channels-last MAVA steps give finite losses and the fp32 update; PGD makes no
   host sync; every attack's invariants hold on CUDA;
2. ``mava_step_fp32``: ``benchmarks/mava_step.py`` on open_clip ViT-B/16 at 224 px (random
   weights, nothing downloaded), batch 32, K = 10, N = 3, M = 5, fp32: images/s, MFU,
   peak memory, ``speedup_vs_authors`` and every ``efficiency_vs_floor``;
3. ``mava_step_bf16_compile``: the same with ``--precision bf16 --compile``;
4. ``sweep_fractional_gpus``: ``benchmarks/sweep_overhead.py``, 2 small MAVA trials at once on
   random-weight tiny-clip (written here: a fresh machine has no pretrained cache), each
   worker holding 0.5 GPU.

``OUT/gpu_check.json`` holds every step's command, exit status, seconds and result
(the step's own JSON, or the tail of its output when it failed) and a ``summary``
(tests passed/failed, images/s, MFU, peak GiB, the ratios). ``--dry-run`` writes the
plan without running anything (works without CUDA; ``tests/test_benchmarks.py`` checks it).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ElementTree  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from benchmarks.common import write_json  # noqa: E402

PYTHON = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout_s: int
    result_file: str | None  # the step's own JSON (or JUnit XML for the tests), relative to OUT


def plan(out: Path) -> list[Step]:
    """The four steps, in order; paths under ``out``."""
    mava = [PYTHON, "benchmarks/mava_step.py", "--model", "vit-b-16-random", "--device", "cuda", "--batch", "32",
            "--pgd-steps", "10", "--N", "3", "--M", "5", "--repeats", "3", "--warmup", "1", "--no-scaling"]
    weights = out / "random-tiny-clip.safetensors"
    return [
        Step("tests", [PYTHON, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
                       f"--junitxml={out / 'gpu_tests.xml'}"], 120, "gpu_tests.xml"),
        Step("mava_step_fp32", mava + ["--json", str(out / "mava_step_fp32.json")], 100, "mava_step_fp32.json"),
        Step("mava_step_bf16_compile", mava + ["--precision", "bf16", "--compile", "--json", str(out / "mava_step_bf16_compile.json")],
             240, "mava_step_bf16_compile.json"),  # on an H200, 210 s did not cover compiling the five variants
        Step("sweep_fractional_gpus", [PYTHON, "benchmarks/sweep_overhead.py", "--model", f"tiny-clip@{weights}", "--trials", "2",
                                       "--train-images", "64", "--eval-images", "32", "--epochs", "1", "--gpus-per-worker", "0.5",
                                       "--max-concurrent", "2", "--json", str(out / "sweep_fractional_gpus.json")],
             80, "sweep_fractional_gpus.json"),
    ]


def write_random_tiny_clip(path: Path) -> None:
    """The tiny architecture with random weights (a fresh GPU machine has no pretrained tiny-clip)."""
    import torch
    from safetensors.torch import save_file

    from trainables.models.tiny_clip import build_tiny_clip

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_tiny_clip().state_dict().items()}, str(path))


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped of a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def read_result(out: Path, step: Step) -> dict | None:
    if step.result_file is None or not (out / step.result_file).is_file():
        return None
    path = out / step.result_file
    return junit_counts(path) if path.suffix == ".xml" else json.loads(path.read_text())


def summarise(results: dict[str, dict]) -> dict:
    """The numbers issue 19 asks for, from the steps' results (missing ones stay None)."""
    summary: dict[str, object] = {"tests": (results.get("tests") or {}).get("result")}
    for name in ("mava_step_fp32", "mava_step_bf16_compile"):
        result = (results.get(name) or {}).get("result") or {}
        peak = (result.get("peak_memory_bytes") or {}).get("mava")
        summary[name] = {
            "images_per_second": result.get("images_per_second"), "mfu": result.get("mfu"),
            "peak_memory_gib": peak / 2**30 if peak is not None else None,
            "speedup_vs_authors": result.get("speedup_vs_authors"), "speedup_vs_authors_flops": result.get("speedup_vs_authors_flops"),
            "speedup_vs_authors_fare": result.get("speedup_vs_authors_fare"),
            "efficiency_vs_floor_by_step": result.get("efficiency_vs_floor_by_step"),
        }
    sweep = (results.get("sweep_fractional_gpus") or {}).get("result") or {}
    summary["sweep_fractional_gpus"] = {"trials": len(sweep.get("trials", [])), "wall_seconds": sweep.get("wall_seconds"),
                                        "training_seconds": sweep.get("training_seconds")}
    return summary


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = [step for step in plan(out) if step.name not in args.skip]
    report: dict = {"benchmark": "gpu_check", "dry_run": args.dry_run, "budget_s": args.budget_s,
                    "plan": [{"name": s.name, "command": s.command, "timeout_s": s.timeout_s} for s in steps], "steps": {}}
    if args.dry_run:
        for step in steps:
            print(f"[{step.name}] (<= {step.timeout_s} s) {' '.join(step.command)}")
        return report
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine (or pass --dry-run to see the plan)")
    report["gpu"] = torch.cuda.get_device_name(0)
    if any(step.name == "sweep_fractional_gpus" for step in steps):
        write_random_tiny_clip(out / "random-tiny-clip.safetensors")
    started = time.perf_counter()
    for step in steps:
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            report["steps"][step.name] = {"command": step.command, "skipped": "budget spent"}
            continue
        limit = int(min(step.timeout_s, left))
        print(f"[{step.name}] (<= {limit} s) {' '.join(step.command)}", flush=True)
        step_started = time.perf_counter()
        try:
            done = subprocess.run(step.command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            returncode = None
            output = f"timed out after {limit} s\n" + ((expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or ""))
        seconds = time.perf_counter() - step_started
        result = read_result(out, step)
        report["steps"][step.name] = {"command": step.command, "returncode": returncode, "seconds": seconds, "result": result,
                                      "output_tail": output[-4000:] if returncode != 0 or result is None else output[-800:]}
        print(f"[{step.name}] exit {returncode} after {seconds:.0f} s", flush=True)
    report["total_seconds"] = time.perf_counter() - started
    report["summary"] = summarise(report["steps"])
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder for every step's output and gpu_check.json")
    parser.add_argument("--budget-s", type=int, default=540, help="stop starting steps after this many seconds (default 9 min)")
    parser.add_argument("--skip", action="append", default=[], choices=[s.name for s in plan(Path("."))],
                        help="leave a step out (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan only; runs nothing (no CUDA needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    write_json(str(Path(args.out) / "gpu_check.json"), report)
    if "summary" in report:
        print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
