"""Issue 19: the authors' baselines of ``benchmarks/mava_step.py`` run and their FLOPs add up.

No timing is asserted (``tests/test_step_performance.py`` runs the benchmark itself). Each FLOP test counts the whole baseline step once and
checks it equals the sum of its parts counted alone (text encoder, ``F_org``, the
attack's passes, the trained forward/backward passes, the loss's matmuls), so a
baseline that silently skipped or duplicated work would fail.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import mava_step as mava_benchmark
from benchmarks.authors_mava import authors_mava_step
from benchmarks.robustvlm_fare import robustvlm_fare_step
from trainables.config import TrainConfig
from trainables.data.synthetic import SyntheticWorld
from trainables.train import build_optimizer

BATCH, K, N, M = 1, 2, 1, 2  # one image, two captions: the smallest batch that repeats


@pytest.fixture()
def batch(random_tiny_clip):
    world = SyntheticWorld("train", BATCH, image_size=random_tiny_clip.image_size, seed=0)
    random_tiny_clip.freeze_text()
    return random_tiny_clip, torch.stack([world[i].image for i in range(BATCH)]), [world[i].captions for i in range(BATCH)]


def _count(function) -> int:
    return mava_benchmark.count_flops(function)


def _input_gradient_pass(model, pixels: torch.Tensor) -> None:
    pixels = pixels.clone().requires_grad_(True)
    torch.autograd.grad(model.encode_image(pixels).sum(), pixels)


def _train_pass(model, pixels: torch.Tensor, input_gradient: bool = False) -> None:
    """Forward + backward with the weights' gradients (and the input's, as a PGD step with backward() needs)."""
    model.encode_image(pixels.clone().requires_grad_(input_gradient)).sum().backward()
    model.vision.zero_grad(set_to_none=True)


def _loss_matmul(rows: int, dim: int) -> int:
    """One (rows, dim) @ (dim, rows) similarity forward, and its backward to the image side only."""
    return 2 * (2 * rows * rows * dim)


@pytest.mark.parametrize("pgd_gradient", ["autograd", pytest.param("backward", marks=pytest.mark.slow)])
def test_authors_mava_step_runs_updates_the_encoder_and_counts_the_flops_of_its_parts(batch, pgd_gradient):
    model, images, captions = batch
    config = TrainConfig(pgd_steps=K, N=N, M=M, lr=0.05, momentum=0.0, weight_decay=0.0)
    before = [p.detach().clone() for p in model.vision.parameters()]
    optimizer = build_optimizer(config, model.vision.parameters())
    terms = authors_mava_step(model, images, captions, config, pgd_gradient=pgd_gradient)
    assert set(terms) == {"loss", "l_cms", "l_vsse", "l_sca"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    optimizer.step()
    assert max((p - q).abs().max().item() for p, q in zip(model.vision.parameters(), before)) > 0

    n = BATCH * M  # every image repeated M times
    repeated = images.repeat_interleave(M, dim=0)
    texts = [caption for group in captions for caption in group[:M]]
    with torch.no_grad():
        text = _count(lambda: model.encode_text(texts))
        original = _count(lambda: model.encode_image_original(repeated))
        dim = model.encode_text(texts[:1]).shape[-1]
    attack_pass = _count(lambda: _input_gradient_pass(model, repeated))
    train_pass = _count(lambda: _train_pass(model, repeated))
    train_and_input_pass = _count(lambda: _train_pass(model, repeated, input_gradient=True))
    # PGD: K passes (input gradient only, or a full backward with weight gradients), each with the loss matmul;
    # outer: the clean view and the averaged adversarial view, forward/backward, and the loss matmul once more.
    # The averaged view requires gradients (pgd_2 sets requires_grad on iterates it has already stored),
    # so its backward also reaches the pixels, as in the script.
    pgd_pass = attack_pass if pgd_gradient == "autograd" else train_and_input_pass
    expected = text + original + K * (pgd_pass + _loss_matmul(n, dim)) + train_pass + train_and_input_pass + _loss_matmul(n, dim)

    def whole_step() -> None:
        authors_mava_step(model, images, captions, config, pgd_gradient=pgd_gradient)["loss"].backward()

    assert _count(whole_step) == expected
    assert train_pass > 1.3 * attack_pass  # the weight gradients that autograd.grad skips are real work


@pytest.mark.parametrize("pgd_gradient", ["autograd", pytest.param("backward", marks=pytest.mark.slow)])
def test_robustvlm_fare_step_runs_and_counts_the_flops_of_its_parts(batch, pgd_gradient):
    model, images, _ = batch
    config = TrainConfig(pgd_steps=K)
    terms = robustvlm_fare_step(model, images, config, torch.Generator().manual_seed(0), pgd_gradient=pgd_gradient)
    assert set(terms) == {"loss", "l_fare"} and torch.isfinite(terms["loss"])
    with torch.no_grad():
        original = _count(lambda: model.encode_image_original(images))
        clean_forward = _count(lambda: model.encode_image(images))
    attack_pass = _count(lambda: _input_gradient_pass(model, images))
    train_pass = _count(lambda: _train_pass(model, images))
    pgd_pass = attack_pass if pgd_gradient == "autograd" else _count(lambda: _train_pass(model, images, input_gradient=True))
    # F_org, K attack passes, the clean forward (logged, not in the loss), the adversarial forward/backward.
    expected = original + K * pgd_pass + clean_forward + train_pass

    def whole_step() -> None:
        robustvlm_fare_step(model, images, config, torch.Generator().manual_seed(0), pgd_gradient=pgd_gradient)["loss"].backward()

    assert _count(whole_step) == expected



# ---- benchmarks/gpu_check.py: everything but CUDA -------------------------------------------


def test_gpu_check_dry_run_writes_the_plan_of_four_steps_within_eight_minutes(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT

    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["steps"] == {}
    steps = {step["name"]: step["command"] for step in report["plan"]}
    assert list(steps) == ["tests", "mava_step_fp32", "mava_step_bf16_compile", "sweep_fractional_gpus"]
    # 9 minutes, not the 8: compiling the bf16 step took over 210 s on an H200 (BENCHMARKS.md).
    assert sum(step["timeout_s"] for step in report["plan"]) <= 9 * 60 and report["budget_s"] <= 9 * 60
    assert "-m" in steps["tests"] and "gpu" in steps["tests"]
    assert {"--model", "vit-b-16-random", "--device", "cuda"} <= set(steps["mava_step_fp32"])
    assert {"--precision", "bf16", "--compile"} <= set(steps["mava_step_bf16_compile"])
    assert steps["sweep_fractional_gpus"][steps["sweep_fractional_gpus"].index("--gpus-per-worker") + 1] == "0.5"
    # Every command's flags are ones its script accepts.
    from benchmarks import mava_step, sweep_overhead

    mava_step.parse_args(steps["mava_step_bf16_compile"][2:])
    sweep_overhead.parse_args(steps["sweep_fractional_gpus"][2:])
    refused = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "real")], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)
    if not __import__("torch").cuda.is_available():
        assert refused.returncode != 0 and "no CUDA device" in refused.stderr


def test_gpu_check_summary_reads_the_steps_results(tmp_path):
    from benchmarks.gpu_check import junit_counts, summarise

    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="9" failures="1" errors="0" skipped="2"/></testsuites>')
    step = {"images_per_second": 50.0, "mfu": 0.4, "peak_memory_bytes": {"mava": 3 * 2**30}, "speedup_vs_authors": 4.2,
            "speedup_vs_authors_flops": 4.3, "speedup_vs_authors_fare": 1.2, "efficiency_vs_floor_by_step": {"mava": 1.01}}
    summary = summarise({"tests": {"result": junit_counts(xml)}, "mava_step_fp32": {"result": step},
                         "sweep_fractional_gpus": {"result": {"trials": [{}, {}], "wall_seconds": 60.0, "training_seconds": 40.0}}})
    assert summary["tests"] == {"tests": 9, "failures": 1, "errors": 0, "skipped": 2}
    assert summary["mava_step_fp32"]["peak_memory_gib"] == 3.0 and summary["mava_step_fp32"]["mfu"] == 0.4
    assert summary["mava_step_bf16_compile"]["images_per_second"] is None  # a step that wrote nothing stays None
    assert summary["sweep_fractional_gpus"] == {"trials": 2, "wall_seconds": 60.0, "training_seconds": 40.0}


def test_evaluate_attacks_benchmark_reports_cost_against_the_floor(random_tiny_clip_weights, tmp_path):
    import json

    from benchmarks import evaluate_attacks

    out = tmp_path / "evaluate_attacks.json"
    evaluate_attacks.main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--images", "2", "--attacks", "pgd,co-attack",
                           "--json", str(out)])
    rows = {row["attack"]: row for row in json.loads(out.read_text())["attacks"]}
    assert list(rows) == ["pgd", "co-attack"]
    for row in rows.values():
        assert row["efficiency_vs_floor"] == pytest.approx(row["seconds"] / row["floor_seconds"])
        assert row["floor_seconds"] == pytest.approx(row["image_floor_seconds"] + row["text_floor_seconds"])
        assert row["seconds_per_image"] == pytest.approx(row["seconds"] / 2) and 0 <= row["text_share"] <= 1
        assert row["image_passes_made"] == row["image_passes_needed"]  # no attack makes an image pass its algorithm does not need
        assert 0 < row["distinct_texts"] <= row["texts_encoded"]
    assert rows["pgd"]["image_passes_needed"] == {"grad x2": 10} and rows["pgd"]["distinct_texts"] == 10  # 2 images x 5 captions
    assert rows["co-attack"]["distinct_texts"] > rows["pgd"]["distinct_texts"]  # blanked and candidate captions


def test_rerank_cost_benchmark_checks_batched_against_the_per_image_loops(tmp_path):
    import json

    from benchmarks import rerank_cost
    from trainables.evaluation.rerank import RerankedScores

    out = tmp_path / "rerank_cost.json"
    rerank_cost.main(["--images", "6", "--k-test", "3", "--repeats", "1", "--warmup", "0", "--candidates", "self",
                      "--json", str(out)])
    rows = {row["model"]: row for row in json.loads(out.read_text())["models"]}
    assert set(rows["tiny-albef"]["wall_seconds"]) == {"batched", "per_image_loop", "albef_loop"}
    assert set(rows["tiny-blip"]["wall_seconds"]) == {"batched", "per_image_loop"}  # no text-only layers to cache
    for row in rows.values():
        assert row["pairs_in_loop"] == 6 * 3 + 30 * 3 and 0 < row["distinct_pairs"] <= row["pairs_in_loop"]
        assert all(difference < 1e-4 for difference in row["max_abs_difference"].values())
        loop = row["cpu_seconds"]["per_image_loop"]["median"] / row["cpu_seconds"]["batched"]["median"]
        assert row["speedup"]["per_image_loop"]["cpu"] == pytest.approx(loop)
    # The equality check the benchmark relies on does fail on different scores.
    scores = RerankedScores(i2t=torch.zeros(2, 3), t2i=torch.zeros(2, 3))
    with pytest.raises(AssertionError, match="differs"):
        rerank_cost.check_same(scores, RerankedScores(i2t=torch.zeros(2, 3), t2i=torch.full((2, 3), 1e-3)), "loop")
