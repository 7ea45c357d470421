"""Fine-tuning a captioner (BLIP, no text encoder) with the paper's Eq. 8, on a tiny random BLIP, offline.

App. A.4: "Due to lack of text encoder in BLIP, we only use L_VSSE and L_SCA in
L_outer": ``L_outer = b*L_VSSE + c*L_SCA`` (Eq. 8). The inner PGD has no L_CMS to
maximise either, so it maximises L_VSSE.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from tests.test_real_models import write_blip_dir
from platform.sweep_spec import parse_sweep_spec
from trainables.config import TrainConfig, train_config_from
from trainables.defenses.mava import mava_inner_loss, mava_outer_loss, sca_loss, vsse_loss
from trainables.errors import UserError
from trainables.evaluation import captioning
from trainables.models import MODEL_KINDS, is_captioner_spec, load_model
from trainables.names import RECALL_KEYS
from trainables.train import run_training


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return write_blip_dir(tmp_path_factory.mktemp("blip") / "cap", BlipForConditionalGeneration)


@pytest.fixture()
def no_java(monkeypatch):
    """Score captions without Java (METEOR absent, a simple tokenizer): seconds instead of a JVM start per evaluation."""
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)


def captioner_config(directory, **overrides) -> TrainConfig:
    values = dict(model=f"hf-blip-cap:{directory}", train_data="synthetic:train,n=8", eval_data="synthetic:test,n=4",
                  epochs=1, batch_size=4, pgd_steps=2, N=2, a=0, eval_attacks=[], eval_every=0, lr=1e-2)
    values.update(overrides)
    return train_config_from(values)


def collect():
    reports = []
    return reports, lambda metrics, checkpoint: reports.append((metrics, checkpoint))


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


# ---- the pure losses: Eq. 8 -------------------------------------------------------------------


def test_the_eq8_outer_loss_is_b_vsse_plus_c_sca_by_hand_and_has_no_cms_term():
    generator = torch.Generator().manual_seed(0)
    neighbours, clean, original = (torch.randn(shape, generator=generator) for shape in ((2, 3, 4), (2, 4), (2, 4)))
    b, c = 0.4, 0.6
    terms = mava_outer_loss(neighbours, clean, original, None, 0.0, b, c)
    # By hand: L_VSSE = mean_i mean_j ||F(v'+r_j) - F_org(v)||^2; L_SCA = mean_i 0.5 ||F(v) - F_org(v)||^2.
    vsse = ((neighbours - original[:, None]) ** 2).sum(-1).mean()
    sca = (0.5 * ((clean - original) ** 2).sum(-1)).mean()
    assert set(terms) == {"loss", "l_vsse", "l_sca"}
    assert torch.allclose(terms["l_vsse"], vsse) and torch.allclose(terms["l_sca"], sca)
    assert torch.allclose(terms["loss"], b * vsse + c * sca)
    # With captions, the same features give Eq. 6 with its L_CMS term.
    assert "l_cms" in mava_outer_loss(neighbours, clean, original, torch.randn(2, 5, 4, generator=generator), 0.002, b, c)


def test_the_eq8_inner_loss_is_vsse_alone_and_a_nonzero_a_without_captions_is_an_error():
    generator = torch.Generator().manual_seed(1)
    adversarial, original = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    assert torch.allclose(mava_inner_loss(adversarial, original, None), vsse_loss(adversarial[:, None], original))
    assert not torch.allclose(mava_inner_loss(adversarial, original, None), sca_loss(adversarial, original))
    with pytest.raises(ValueError, match="a=0.002 weights L_CMS.*no caption features"):
        mava_outer_loss(adversarial[:, None], adversarial, original, None, 0.002, 0.4, 0.6)
    with pytest.raises(ValueError, match="inner_text_distance needs caption features"):
        mava_inner_loss(adversarial, original, None, inner_text_distance=True)


# ---- the training loop ------------------------------------------------------------------------


def test_mava_fine_tunes_the_captioners_vision_with_eq8_and_leaves_its_decoder_alone(captioner_dir, tmp_path, no_java):
    model = load_model(f"hf-blip-cap:{captioner_dir}")
    vision, decoder, original = (snapshot(m.parameters()) for m in (model.vision, model.text_decoder, model.vision_original))
    reports, report = collect()
    # M=6 > the 5 captions of each synthetic image: a captioner's training reads no captions, so it is not refused.
    metrics = run_training(captioner_config(captioner_dir, M=6), report, tmp_path / "ckpt", model=model)
    assert any(not torch.equal(a, b) for a, b in zip(vision, model.vision.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(decoder, model.text_decoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(original, model.vision_original.parameters()))
    assert {"train/loss", "train/l_vsse", "train/l_sca"} <= set(metrics) and "train/l_cms" not in metrics
    assert metrics["train/loss"] == pytest.approx(0.4 * metrics["train/l_vsse"] + 0.6 * metrics["train/l_sca"], rel=1e-5)
    # Evaluated on clean captions, never as retrieval recall.
    assert {"clean/bleu4", "clean/rouge_l", "clean/cider"} <= set(metrics)
    assert not any(key.endswith(tuple(f"/{k}" for k in RECALL_KEYS)) for key in metrics)
    checkpoint = reports[-1][1]
    assert (checkpoint / "vision.safetensors").is_file()
    assert json.loads((checkpoint / "state.json").read_text())["config"]["a"] == 0


def test_a_captioners_run_resumes_exactly_from_its_checkpoint(captioner_dir, tmp_path, no_java):
    config = captioner_config(captioner_dir, epochs=2)
    full_reports, full_report = collect()
    run_training(config, full_report, tmp_path / "full")
    resumed_reports, resumed_report = collect()
    run_training(config, resumed_report, tmp_path / "resumed", resume_from=full_reports[0][1])
    assert [int(m["epoch"]) for m, _ in resumed_reports] == [2]
    full = load_file(str(full_reports[-1][1] / "vision.safetensors"))
    resumed = load_file(str(resumed_reports[-1][1] / "vision.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert resumed_reports[-1][0]["train/loss"] == full_reports[-1][0]["train/loss"]


def test_fare_fine_tunes_a_captioner(captioner_dir, tmp_path, no_java):
    metrics = run_training(captioner_config(captioner_dir, defense="fare"), lambda m, c: None, tmp_path)
    assert "train/l_fare" in metrics and "clean/cider" in metrics


# ---- what a captioner cannot do is refused, naming the fix --------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"defense": "tecoa"}, r"captioning model \(no text encoder\).*defense 'tecoa' needs caption features.*use defense: mava"),
    ({"a": 0.002}, r"a=0.002 weights L_CMS.*Eq. 8.*set a: 0"),
    ({"inner_text_distance": True}, "set inner_text_distance: false"),
    ({"cms_form": "neg_cos_sum"}, "cms_form=neg_cos_sum shapes L_CMS"),
    ({"eval_attacks": ["pgd"]}, r"eval_attacks \['pgd'\].*clean captions.*set eval_attacks: \[\]"),
])
def test_options_a_captioner_cannot_honour_are_refused_at_validation(captioner_dir, values, message):
    with pytest.raises(UserError, match=message):
        captioner_config(captioner_dir, **values)


def test_the_loop_checks_the_loaded_model_too(captioner_dir, random_tiny_clip_weights, tmp_path):
    # The config names a CLIP (so validation passes) but the model handed in is a captioner.
    config = TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", defense="tecoa", train_data="synthetic:train,n=4",
                         eval_attacks=(), epochs=1)
    with pytest.raises(UserError, match="is a captioning model.*defense 'tecoa' needs caption features"):
        run_training(config, lambda m, c: None, tmp_path, model=load_model(f"hf-blip-cap:{captioner_dir}"))


def test_captioners_are_told_apart_by_their_class_before_loading(captioner_dir, tmp_path):
    assert is_captioner_spec(f"hf-blip-cap:{captioner_dir}") and is_captioner_spec("hf-blip-cap:/not/there")
    assert not any(is_captioner_spec(spec) for spec in ("tiny-clip", "open_clip:ViT-B-16@/w.pt", "hf-clip:/d", "hf-blip-itr:/d", "vit-xyz"))
    retrieval_dir = write_blip_dir(tmp_path / "itr", BlipForImageTextRetrieval)
    for kind, directory in (("hf-blip-cap", captioner_dir), ("hf-blip-itr", retrieval_dir)):
        model = load_model(f"{kind}:{directory}")
        assert type(model) is MODEL_KINDS[kind].model_class
        assert model.has_text_encoder is not is_captioner_spec(f"{kind}:{directory}")


# ---- sweeps and the one-run command -------------------------------------------------------------


def _captioner_sweep(directory, metric: str, **experiment) -> dict:
    return {"experiment": {"name": "cap", "model": f"hf-blip-cap:{directory}", "eval_attacks": [],
                           "a": 0, **experiment},
            "search": {"algorithm": "grid", "objectives": [{"metric": metric}]}}


def test_a_captioner_sweep_optimises_a_caption_metric_and_refuses_recall(captioner_dir):
    assert parse_sweep_spec(_captioner_sweep(captioner_dir, "clean/cider"), "cap.yaml").objective_metrics() == ["clean/cider"]
    with pytest.raises(UserError, match=r"'clean/tr1' is not produced.*captioner.*valid: clean/bleu1.*clean/cider"):
        parse_sweep_spec(_captioner_sweep(captioner_dir, "clean/tr1"), "cap.yaml")
    with pytest.raises(UserError, match="METEOR|'clean/meteor' is not produced"):
        parse_sweep_spec(_captioner_sweep(captioner_dir, "clean/meteor"), "cap.yaml")
    with pytest.raises(UserError, match="key 'experiment'.*set a: 0"):
        parse_sweep_spec(_captioner_sweep(captioner_dir, "clean/cider", a=0.002), "cap.yaml")


def test_the_finetune_command_trains_and_scores_a_captioner(captioner_dir, tmp_path, no_java, capsys):
    from platform.finetune import main

    out = tmp_path / "out"
    assert main(["--model", f"hf-blip-cap:{captioner_dir}", "--train-data", "synthetic:train,n=4", "--eval-data", "synthetic:test,n=2",
                 "--epochs", "1", "--set", "a=0", "--set", "eval_attacks=", "--set", "pgd_steps=1", "--set", "N=1",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["threat"] == "clean" and "clean/cider" in results["before"] and "clean/cider" in results["after"]
    assert "train/l_cms" not in results["after"]
    assert "clean BLEU4 | clean CIDER" in capsys.readouterr().out


def test_a_published_captioner_card_does_not_claim_white_box_robustness(tmp_path):
    from platform.tracking import write_card

    (tmp_path / "vision.safetensors").write_bytes(b"weights")
    params = {"model": "hf-blip-cap:/models/blip-cap", "defense": "mava", "eps": 2 / 255}
    card = json.loads(write_card(tmp_path, params, {"clean/cider": 50.0}, tmp_path / "vision.safetensors").read_text())
    assert card["threat_model"].startswith("none: clean captions only")
