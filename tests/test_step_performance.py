"""Issue 7: the fast MAVA step computes the naive step's mathematics; speed options validate; benchmarks run.

No timing is asserted here (timings live in BENCHMARKS.md): these tests check that
every saving of the optimised step leaves the loss terms and the parameter update
unchanged, and that the benchmark scripts produce what BENCHMARKS.md documents.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import mava_step as mava_benchmark
from conftest import REPO_ROOT
from benchmarks.naive_mava import naive_mava_step
from trainables.config import Precision, TrainConfig, train_config_from
from trainables.data.synthetic import SyntheticWorld
from trainables.errors import UserError
from trainables.steps import make_encoders, mava_step, step_precision
from trainables.train import build_optimizer, check_speed_options, frozen_features, run_training

BATCH = 6


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld("train", BATCH, image_size=32, seed=0)


@pytest.fixture()
def drifted_model(random_tiny_clip):
    """The random tiny CLIP with its trainable encoder moved off F_org, so that L_SCA is not zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in random_tiny_clip.vision.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    random_tiny_clip.freeze_text()
    return random_tiny_clip


def optimised_update(model, world, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One step exactly as run_training takes it: cached frozen features, make_encoders, then backward + step."""
    cache = frozen_features(model, world, config.M, BATCH, torch.device("cpu"))
    ids = [world.item_id(i) for i in range(BATCH)]
    images = torch.stack([world[i].image for i in range(BATCH)])
    attack, train = make_encoders(model.vision, model.vision, model.normalize, config)
    optimizer = build_optimizer(config, model.vision.parameters())
    model.vision.train()
    with step_precision(config, torch.device("cpu")):
        terms = mava_step(attack, train, images, torch.stack([cache[i][0] for i in ids]), torch.stack([cache[i][1] for i in ids]),
                          config, generator)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms


def naive_update(model, world, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    images = torch.stack([world[i].image for i in range(BATCH)])
    optimizer = build_optimizer(config, model.vision.parameters())
    model.vision.train()
    terms = naive_mava_step(model, images, [world[i].captions for i in range(BATCH)], config, generator)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms


@pytest.mark.parametrize("variant", [
    {},  # the paper's default: uniform neighbours, raw embeddings, 1 - cos, 0.5 on L_SCA
    {"neighbours": "last_iterates", "embedding_space": "normalized"},  # the last plain-PGD iterates; the authors' distances
    {"cms_form": "neg_cos_sum", "sca_half": False, "inner_text_distance": True},  # the authors' code's loss terms
])
def test_optimised_step_computes_the_naive_steps_loss_terms_and_parameter_update(drifted_model, world, variant):
    # SGD without momentum at a large lr: one step moves the weights far more than the tolerance.
    config = TrainConfig(pgd_steps=3, N=2, M=3, lr=0.05, momentum=0.0, weight_decay=0.0, **variant)
    before = {name: p.detach().clone() for name, p in drifted_model.vision.named_parameters()}
    fast, slow = drifted_model, copy.deepcopy(drifted_model)
    fast_generator, slow_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    fast_terms = optimised_update(fast, world, config, fast_generator)
    slow_terms = naive_update(slow, world, config, slow_generator)

    assert fast_terms.keys() == slow_terms.keys() == {"loss", "l_cms", "l_vsse", "l_sca"}
    for key in fast_terms:
        assert fast_terms[key].item() == pytest.approx(slow_terms[key].item(), rel=1e-5, abs=1e-7), key
    assert slow_terms["l_sca"].item() > 1e-4, "the drifted encoder must make L_SCA count"
    moved = max((p - before[n]).abs().max().item() for n, p in slow.vision.named_parameters())
    difference = max((p - q).abs().max().item() for p, q in zip(fast.vision.parameters(), slow.vision.parameters()))
    assert moved > 1e-3 and difference < 1e-4 * moved
    # Both consumed the generator identically (PGD random start, then the neighbour noise).
    assert torch.equal(torch.rand(4, generator=fast_generator), torch.rand(4, generator=slow_generator))


def test_the_attack_encoder_leaves_parameter_gradients_alone(drifted_model):
    config = TrainConfig()
    attack, _ = make_encoders(drifted_model.vision, drifted_model.vision, drifted_model.normalize, config)
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    features = attack(pixels)
    features.sum().backward()  # even a full backward reaches the input only: the graph holds no weights
    assert pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in drifted_model.vision.parameters())
    assert torch.allclose(features, drifted_model.encode_image(pixels), atol=1e-6)  # same weights, same function


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp16"}, "key 'precision'.*'fp32' or 'bf16'"),
    ({"compile": "sometimes"}, "key 'compile'.*boolean"),
    ({"channels_last": 3}, "key 'channels_last'.*boolean"),
])
def test_bad_speed_options_name_the_key(values, message):
    with pytest.raises(UserError, match=message):
        train_config_from(values)


@pytest.mark.parametrize("option, value", [("precision", "bf16"), ("compile", True), ("channels_last", True)])
def test_speed_options_validate_and_are_refused_on_cpu_before_any_loading(random_tiny_clip_weights, tmp_path, option, value):
    config = train_config_from({option: value})
    assert getattr(config, option) != getattr(TrainConfig(), option)  # accepted by validation, not the default
    check_speed_options(TrainConfig(), torch.device("cpu"))  # the defaults are fine everywhere
    with pytest.raises(UserError, match=f"{option}: {'true' if value is True else value}: speed option.*CUDA.*resolved device 'cpu'"):
        check_speed_options(train_config_from({option: value, "device": "cpu"}), torch.device("cpu"))
    # run_training refuses before it loads a model or data (the weights path here would load fine).
    with pytest.raises(UserError, match="speed option"):
        run_training(TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", device="cpu", **{option: value}), lambda m, c: None, tmp_path)


def test_bf16_and_channels_last_steps_stay_close_to_fp32(drifted_model, world):
    reference = optimised_update(copy.deepcopy(drifted_model), world, TrainConfig(pgd_steps=2, N=2, M=3), torch.Generator().manual_seed(3))
    nhwc = copy.deepcopy(drifted_model)
    nhwc.vision.to(memory_format=torch.channels_last)
    channels_last = optimised_update(nhwc, world, TrainConfig(pgd_steps=2, N=2, M=3, channels_last=True), torch.Generator().manual_seed(3))
    bf16 = optimised_update(copy.deepcopy(drifted_model), world, TrainConfig(pgd_steps=2, N=2, M=3, precision="bf16"),
                            torch.Generator().manual_seed(3))
    for key in reference:
        assert channels_last[key].item() == pytest.approx(reference[key].item(), rel=1e-4, abs=1e-6), key
        assert bf16[key].dtype == torch.float32  # losses are computed in fp32 from bf16 features
    assert bf16["loss"].item() == pytest.approx(reference["loss"].item(), rel=0.05)


def test_training_reports_its_setup_time_once_per_start(random_tiny_clip_weights, tmp_path):
    reports = []
    config = TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", train_data="synthetic:train,n=6", eval_data="synthetic:test,n=4",
                         epochs=2, batch_size=6, pgd_steps=1, N=1, M=2, eval_every=0, eval_eps=("4/255",))
    run_training(config, lambda metrics, checkpoint: reports.append(metrics), tmp_path)
    first, second = reports
    assert first["time/setup_seconds"] > 0 and "time/setup_seconds" not in second
    assert math.isfinite(second["train/loss"]) and second["time/epoch_seconds"] >= second["time/train_seconds"] > 0


def test_flop_counting_and_mfu_arithmetic():
    assert mava_benchmark.peak_tflops("NVIDIA H100 80GB HBM3", Precision.BF16) == 989.4
    assert mava_benchmark.peak_tflops("NVIDIA H100 PCIe", Precision.FP32) == 51.2
    assert mava_benchmark.peak_tflops("NVIDIA H200", Precision.BF16) == 989.4
    assert mava_benchmark.peak_tflops("Some Future GPU", Precision.BF16) is None
    assert mava_benchmark.model_flop_utilisation(2e12, 0.5, 8.0) == pytest.approx(0.5)
    assert mava_benchmark.model_flop_utilisation(2e12, 0.5, None) is None
    linear = torch.nn.Linear(64, 32, bias=False)
    # forward 2*B*in*out; backward: input and weight gradients, the same again each.
    inputs = torch.randn(8, 64, requires_grad=True)
    assert mava_benchmark.count_flops(lambda: linear(inputs).sum().backward()) == 3 * 2 * 8 * 64 * 32


def test_vit_b_16_random_model_is_built_offline_and_counted_at_its_known_size():
    """The GPU benchmark's model: ~17.6 GMAC per 224-px image forward (ViT-B/16's published cost)."""
    model = mava_benchmark.load_benchmark_model(mava_benchmark.RANDOM_VIT)
    assert model.image_size == 224
    with torch.no_grad():
        flops = mava_benchmark.count_flops(lambda: model.encode_image(torch.rand(1, 3, 224, 224)))
    assert 2 * 16.9e9 < flops < 2 * 17.8e9


def test_mava_step_benchmark_runs_and_writes_its_documented_json(random_tiny_clip_weights, tmp_path):
    out = tmp_path / "mava_step.json"
    mava_benchmark.main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--batch", "4", "--pgd-steps", "2", "--N", "2", "--M", "2",
                         "--repeats", "1", "--warmup", "0", "--scaling-repeats", "1", "--scaling-K", "1", "--scaling-N", "1",
                         "--scaling-M", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"settings", "hardware", "seconds", "cpu_seconds", "speedup_vs_naive", "efficiency_vs_floor", "speedup_vs_naive_cpu_time",
            "efficiency_vs_floor_cpu_time", "images_per_second", "flops_per_step",
            "achieved_tflops", "peak_tflops", "mfu", "targets", "scaling"} <= set(result)
    assert set(result["seconds"]) == set(mava_benchmark.VARIANTS) == {"mava", "authors", "naive", "floor", "fare", "fare_authors",
                                                                       "tecoa", "floor_fare"}
    median = {name: row["median"] for name, row in result["seconds"].items()}
    cpu = {name: row["median"] for name, row in result["cpu_seconds"].items()}
    flops = result["flops_per_step"]
    assert set(flops) == set(mava_benchmark.VARIANTS + mava_benchmark.COUNTED_ONLY)
    for key, step, baseline in (("speedup_vs_naive", "mava", "naive"), ("speedup_vs_authors", "mava", "authors"),
                                ("speedup_vs_authors_fare", "fare", "fare_authors")):
        assert result[key] == pytest.approx(median[baseline] / median[step])
        assert result[f"{key}_cpu_time"] == pytest.approx(cpu[baseline] / cpu[step])
        assert result[f"{key}_flops"] == pytest.approx(flops[baseline] / flops[step])
    assert result["efficiency_vs_floor"] == pytest.approx(median["mava"] / median["floor"])
    for step, floor in (("mava", "floor"), ("fare", "floor_fare"), ("tecoa", "floor_fare")):
        assert result["efficiency_vs_floor_by_step"][step] == pytest.approx(median[step] / median[floor])
        # Every optimised step does its floor's encoder work (TeCoA adds its B x B logits: 1e-5 of it).
        assert flops[step] == pytest.approx(flops[floor], rel=1e-5)
    assert result["images_per_second"] == pytest.approx(4 / median["mava"])
    # The naive and the authors' steps do more (text, F_org; the authors' M copies of every image and two
    # outer views; backward() in PGD adds the weight gradients).
    assert flops["naive"] > 1.2 * flops["mava"] and flops["authors"] > 1.3 * flops["mava"] and flops["fare_authors"] > flops["fare"]
    assert flops["authors_backward"] > flops["authors"] and flops["fare_authors_backward"] > flops["fare_authors"]
    assert result["mfu"] is None and result["hardware"]["cpu"]
    assert result["peak_memory_bytes"]["mava"] is None  # CPU: no peak-memory counter
    assert [(row["K"], row["N"], row["M"]) for row in result["scaling"]] == [(2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1)]


@pytest.mark.slow
def test_sweep_overhead_benchmark_runs_and_writes_its_documented_json(ray_session, random_tiny_clip_weights, tmp_path):
    from benchmarks import sweep_overhead

    out = tmp_path / "sweep_overhead.json"
    sweep_overhead.main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--trials", "1", "--train-images", "6", "--eval-images", "4",
                         "--epochs", "1", "--batch", "6", "--pgd-steps", "1", "--N", "1", "--M", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"settings", "hardware", "wall_seconds", "tune_fit_seconds", "training_seconds", "overhead_seconds",
            "overhead_in_trials_seconds", "sweep_overhead", "target", "trials"} <= set(result)
    (trial,) = result["trials"]
    assert trial["setup_seconds"] > 0 and len(trial["epoch_seconds"]) == 1
    assert trial["training_seconds"] < trial["trial_wall_seconds"]  # the trial's MLflow run spans its training
    assert 0 < result["training_seconds"] < result["wall_seconds"]
    assert result["sweep_overhead"] == pytest.approx(result["wall_seconds"] / result["training_seconds"])


def test_processes_that_do_not_train_import_no_model_code():
    """Tune's trial actor and Ray Train's controller import ``trainables.ray_worker`` in fresh processes
    every trial; only the Train workers need torch, open_clip, transformers and the training loop. A
    one-worker trial's trainer brings no torch in either (no process group); a several-worker trial's does (DDP)."""
    probe = ("import sys, trainables.ray_worker as w; w._trainer_class(1); "
             "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'trainables.train', 'trainables.models') if m in sys.modules)); "
             "print(w._trainer_class(2).__name__, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "TorchTrainer True"], result.stdout


def test_the_step_benchmark_times_every_round_on_the_starting_weights(random_tiny_clip_weights):
    """The timed steps do the optimiser's work but leave the shared encoder's weights as they were."""
    model = mava_benchmark.load_benchmark_model(f"tiny-clip@{random_tiny_clip_weights}")
    work = mava_benchmark.build_workload(model, 4, torch.device("cpu"))
    functions = mava_benchmark.step_functions(work, TrainConfig(pgd_steps=2, N=2, M=2, lr=0.05))
    before = {name: p.detach().clone() for name, p in model.vision.named_parameters()}
    for name in mava_benchmark.VARIANTS:
        functions[name]()
        assert all(torch.equal(before[n], p) for n, p in model.vision.named_parameters()), f"{name} moved the weights"
        assert all(p.grad is not None for p in model.vision.parameters() if p.requires_grad), f"{name} computed no update"
