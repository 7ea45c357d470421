"""Issue 14, defect 4: the per-epoch gradient norm of each weighted loss term, logged as ``train/gradnorm_*``.

The logged norms are checked against norms computed here from the loss formulas written
out by hand (not through ``trainables.defenses``), on a one-batch epoch with an eps so
small (1e-6) that the adversarial image and its neighbours equal the clean image to
float precision: then every term is a function of the clean features alone, which this
test can compute without replaying the attack's random draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainables.config import TrainConfig
from trainables.data import load_dataset
from trainables.data.items import collate
from trainables.names import GRADNORM_KEYS, train_metric
from trainables.steps import term_gradient_norms
from trainables.train import run_training

WEIGHTS = {"a": 0.3, "b": 0.7, "c": 1.9}  # distinct, so a weight left out or swapped changes a norm


def shifted_model(model):
    """The model with its trainable vision tower moved off F_org, so L_SCA and L_VSSE have non-zero gradients."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.vision.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def hand_norms(model, config: TrainConfig) -> dict[str, float]:
    """Each weighted term's gradient norm at x' = x, from the paper's formulas (Eqs. 2-4; FARE's distance)."""
    dataset = load_dataset(config.train_data, model.image_size)
    batch = collate([dataset[i] for i in range(len(dataset))])
    model.vision.train()
    features = model.encode_image(batch.images).float()
    with torch.no_grad():
        original = model.encode_image_original(batch.images).float()
        captions = [c for group in batch.captions for c in group[:config.M]]
        text = model.encode_text(captions).float().view(len(batch.images), config.M, -1)
    if config.embedding_space.value == "normalized":
        image, reference = F.normalize(features, dim=-1), F.normalize(original, dim=-1)
    else:
        image, reference = features, original
    squared = ((image - reference) ** 2).sum(dim=-1)  # (B,)
    if config.defense.value == "fare":
        weighted = {"gradnorm_fare": ((features - original) ** 2).sum(dim=-1).mean()}
    else:
        cos = (F.normalize(features, dim=-1).unsqueeze(1) * F.normalize(text, dim=-1)).sum(dim=-1)  # (B, M)
        weighted = {"gradnorm_cms": config.a * (1 - cos).mean(),  # mean over M, then over the batch
                    "gradnorm_vsse": config.b * squared.mean(),  # N neighbours, all equal to x
                    "gradnorm_sca": config.c * 0.5 * squared.mean()}
    parameters = list(model.vision.parameters())
    norms = {}
    for key, value in weighted.items():
        gradients = torch.autograd.grad(value, parameters, retain_graph=True)
        norms[key] = torch.sqrt(sum((g ** 2).sum() for g in gradients)).item()
    return norms


@pytest.mark.parametrize("defense, space", [("mava", "raw"), ("mava", "normalized"), ("fare", "raw")])
def test_logged_gradient_norms_equal_the_hand_computed_norms(random_tiny_clip, random_tiny_clip_weights, tmp_path,
                                                             defense, space):
    config = TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", defense=defense, embedding_space=space,
                         train_data="synthetic:train,n=6", eval_data="synthetic:test,n=4", epochs=1, batch_size=6,
                         eps=1e-6, pgd_step_size=1e-6, pgd_steps=1, N=2, M=3, eval_attacks=(), **WEIGHTS)
    model = shifted_model(random_tiny_clip)
    expected = hand_norms(copy.deepcopy(model), config)
    reports = []
    run_training(config, lambda metrics, checkpoint: reports.append(metrics), tmp_path, model=model)
    logged = {key: reports[0][train_metric(key)] for key in GRADNORM_KEYS if train_metric(key) in reports[0]}
    assert logged.keys() == expected.keys()
    assert all(value > 1e-4 for value in expected.values())  # every term moves the encoder: a zero would prove nothing
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-3), key


def test_measuring_the_norms_leaves_the_gradients_alone():
    """``.grad`` untouched, graph kept: the update after the measurement is the update without it."""
    layer = torch.nn.Linear(3, 2)
    config = TrainConfig(defense="mava", **WEIGHTS)
    out = layer(torch.ones(4, 3))
    terms = {"l_cms": out.sum(), "l_vsse": out.pow(2).sum(), "l_sca": out.abs().sum()}
    norms = term_gradient_norms(terms, config, list(layer.parameters()))
    assert all(p.grad is None for p in layer.parameters())
    (0.3 * terms["l_cms"]).backward()  # the graph is still there
    assert norms["gradnorm_cms"] == pytest.approx(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item())


def test_the_report_draws_the_logged_norms_per_epoch_on_a_log_axis(tmp_path):
    from mlflow.tracking import MlflowClient

    from dashboards.figures import curves_figure
    from dashboards.records import curve_metrics, load_records
    from trainables.names import ROLE_TAG, ROLE_TRIAL, SWEEP_TAG, TRIAL_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("norms", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment_id, tags={ROLE_TAG: ROLE_TRIAL, SWEEP_TAG: "s", TRIAL_TAG: "t1"})
    logged = {"gradnorm_cms": [0.01, 0.02], "gradnorm_vsse": [3.0, 2.0], "gradnorm_sca": [0.0, 1.5]}
    for key, values in logged.items():
        for epoch, value in enumerate(values, start=1):
            client.log_metric(run.info.run_id, train_metric(key), value, step=epoch)
    client.log_metric(run.info.run_id, train_metric("l_cms"), 0.9, step=1)
    client.set_terminated(run.info.run_id)

    trial = load_records(client, "norms", uri).trials[0]
    assert trial.history[train_metric("gradnorm_sca")] == [(1, 0.0), (2, 1.5)]
    figure = curves_figure(trial, *curve_metrics(set(trial.history)))
    norms_panel = figure.axes[2]
    assert norms_panel.get_yscale() == "log"
    lines = {line.get_label(): list(zip(*line.get_data())) for line in norms_panel.get_lines()}
    # Every logged norm, by epoch; L_SCA's zero (epoch 1: F = F_org) cannot sit on a log axis and is left out.
    assert lines == {train_metric("gradnorm_cms"): [(1, 0.01), (2, 0.02)], train_metric("gradnorm_vsse"): [(1, 3.0), (2, 2.0)],
                     train_metric("gradnorm_sca"): [(2, 1.5)]}


def test_every_paper_preset_says_which_embedding_space_it_uses():
    import re
    from pathlib import Path

    import yaml

    presets = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("paper-*.yaml"))
    assert presets
    for path in presets:
        text = path.read_text()
        stated = re.search(r"^\s*# embedding_space: (\w+)", text, re.M)
        assert stated, f"{path.name} does not say which embedding space it uses"
        used = yaml.safe_load(text)["experiment"].get("embedding_space", TrainConfig.model_fields["embedding_space"].default.value)
        assert stated.group(1) == used, path.name
