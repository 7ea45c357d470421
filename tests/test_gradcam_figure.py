"""The paper's Figure 5 (``python -m platform.gradcam``): GradCAM panels of clean and attacked VE pairs per encoder."""

from __future__ import annotations

import albef_fakes
import pytest
import torch
from albef_fakes import write_shifted_encoder, write_tiny_albef
from PIL import Image

from platform.gradcam import main
from trainables.data import load_dataset, parse_data_spec
from trainables.errors import UserError
from trainables.evaluation.gradcam import gradcam_map, heat_overlay
from trainables.evaluation.gradcam_figure import draw_panels, entailment_panels, only_indices
from trainables.models import parse_model_spec


@pytest.fixture(scope="module")
def ve_spec(tmp_path_factory) -> str:
    return albef_fakes.write_tiny_albef_ve_spec(tmp_path_factory.mktemp("gradcam-ve"))


@pytest.fixture(scope="module")
def shifted_encoder(ve_spec, tmp_path_factory):
    return write_shifted_encoder(ve_spec, tmp_path_factory.mktemp("encoder") / "vision.safetensors", seed=5)


def test_panels_are_the_gradcam_of_the_true_class_on_each_encoders_own_attack(ve_spec, shifted_encoder):
    from platform.evaluate import load_evaluated_model

    base = load_evaluated_model(parse_model_spec(ve_spec), None, torch.device("cpu"))
    tuned = load_evaluated_model(parse_model_spec(ve_spec), shifted_encoder, torch.device("cpu"))
    dataset = load_dataset(parse_data_spec("synthetic-ve:test,n=12"), base.image_size)
    indices = only_indices(dataset, 2, label=2)
    assert len(indices) == 2 and all(dataset[i].label == 2 for i in indices)
    panels = entailment_panels({"undefended": base, "tuned": tuned}, dataset, indices, ("pgd", "co-attack"), 4 / 255)
    assert [(p.encoder, p.attack, p.pair) for p in panels[:6]] == [("undefended", a, b) for a in ("clean", "pgd", "co-attack") for b in (0, 1)]
    assert len(panels) == 12
    for panel in panels:
        image = dataset[indices[panel.pair]].image.unsqueeze(0)
        model = base if panel.encoder == "undefended" else tuned
        if panel.attack == "clean":
            scores, attention, mask = model.entailment_cross_attention(image, [panel.hypothesis], torch.tensor([panel.label]))
            expected = heat_overlay(image, gradcam_map(scores, attention, mask, image_size=tuple(image.shape[-2:])))[0]
            assert torch.allclose(panel.picture, expected, atol=1e-5)  # the true class's map over the clean image
            with torch.no_grad():
                probabilities = model.entailment_logits(image, [panel.hypothesis]).softmax(-1)[0]
            assert panel.p_true == pytest.approx(float(probabilities[panel.label]), abs=1e-5)
            assert panel.predicted == int(probabilities.argmax())
        else:
            assert not torch.equal(panel.picture, next(p.picture for p in panels if (p.encoder, p.pair, p.attack) == (panel.encoder, panel.pair, "clean")))
    # White-box per encoder: the two encoders' PGD images differ.
    pgd = {p.encoder: p.picture for p in panels if p.attack == "pgd" and p.pair == 0}
    assert not torch.equal(pgd["undefended"], pgd["tuned"])
    figure = draw_panels(panels, "test")
    assert len(figure.axes) == 12 and figure.axes[0].get_title() == "undefended" and figure.axes[1].get_title() == "tuned"


def test_the_cli_draws_one_column_per_encoder(ve_spec, shifted_encoder, tmp_path, capsys):
    out = tmp_path / "figure5.png"
    assert main(["--model", ve_spec, "--encoder", f"MAVA={shifted_encoder}", "--data", "synthetic-ve:test,n=12",
                 "--attacks", "pgd,co-attack", "--eps", "2/255", "--pairs", "2", "--word-candidates", "offline",
                 "--out", str(out), "--device", "cpu"]) == 0
    width, height = Image.open(out).size
    assert width > 300 and height > 600  # 2 columns, 2 pairs x 3 rows
    assert "2 pairs x (clean + pgd, co-attack) x 2 encoders" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", "synthetic:test,n=4"], "draws visual-entailment pairs, but 'synthetic:test,n=4' is synthetic data"),
    (["--eps", "2/255,4/255"], "one budget"),
    (["--encoder", "MAVA=/no/such/checkpoint"], "does not exist"),
    (["--encoder", "undefended=/x"], "always drawn"),
    (["--attacks", "apgd"], "do not apply to visual entailment"),
], ids=["caption-data", "two-eps", "missing-checkpoint", "reserved-name", "retrieval-attack"])
def test_bad_figure_input_is_one_clear_message(ve_spec, tmp_path, arguments, message):
    defaults = {"--model": ve_spec, "--data": "synthetic-ve:test,n=6", "--out": str(tmp_path / "f.png"), "--word-candidates": "offline"}
    given = dict(zip(arguments[::2], arguments[1::2]))
    with pytest.raises(UserError, match=message):
        main([part for key, value in {**defaults, **given}.items() for part in (key, value)])


def test_a_retrieval_checkpoint_is_refused(tmp_path):
    text_dir, checkpoint = write_tiny_albef(tmp_path, variant="retrieval")
    with pytest.raises(UserError, match="not a VE fusion model"):
        main(["--model", f"albef:{text_dir}@{checkpoint}", "--data", "synthetic-ve:test,n=3", "--attacks", "pgd",
              "--out", str(tmp_path / "f.png")])


def test_map_agreement_is_one_for_the_same_map_and_skips_maps_without_evidence():
    from trainables.evaluation.gradcam_figure import Panel, map_agreement

    def panel(encoder, attack, heat):
        return Panel(encoder=encoder, pair=0, attack=attack, eps=None, picture=torch.zeros(3, 2, 2), heat=heat,
                     hypothesis="a", changed=[], label=2, predicted=2, p_true=0.9)

    peak = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    found = map_agreement([panel("base", "clean", peak), panel("tuned", "clean", 2 * peak), panel("tuned", "pgd", peak.flip(1)),
                           panel("flat", "clean", torch.zeros(2, 2))], "base")
    assert found[("tuned", "clean")] == [pytest.approx(1.0)]  # the same place, at any scale
    assert found[("tuned", "pgd")] == [pytest.approx(-1 / 3)]  # a peak moved elsewhere
    assert ("flat", "clean") not in found  # no evidence: no correlation to report
