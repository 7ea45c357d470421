"""The grounding figure (``python -m platform.gradcam --task grounding``): each panel is the evaluation's own decision."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_grounding_eval import HAND_ITEMS, BrightnessGrounder

from albef_fakes import write_shifted_encoder, write_tiny_albef, write_tiny_albef_ve_spec
from platform.gradcam import main
from trainables.data import load_dataset, parse_data_spec
from trainables.errors import UserError
from trainables.evaluation.gradcam import heat_overlay, upsample_map
from trainables.evaluation.grounding import box_iou, ground, is_hit
from trainables.evaluation.grounding_eval import grounding_maps
from trainables.evaluation.grounding_figure import draw_grounding_panels, grounding_panels
from trainables.models import parse_model_spec


def test_the_hand_case_panels_choose_the_boxes_the_map_points_at():
    panels = grounding_panels({"hand": BrightnessGrounder()}, HAND_ITEMS, [0, 1, 2, 3], (), 4 / 255)
    assert [(p.encoder, p.attack, p.pair) for p in panels] == [("hand", "clean", i) for i in range(4)]
    # Items 0, 1 and 3: the bright cell's proposal, a hit; item 2: the map picks (0, 48), not the truth (48, 48).
    assert [p.hit for p in panels] == [True, True, False, True]
    assert [p.chosen for p in panels] == [1, 0, 0, 0]
    assert panels[2].iou == 0.0 and panels[0].iou == 1.0
    assert all(p.changed == [] and p.picture.shape == (3, 32, 32) for p in panels)
    figure = draw_grounding_panels(panels, "hand")
    assert len(figure.axes) == 4 and figure.axes[0].get_title() == "hand\nclean"
    assert figure.axes[2].get_xaxis().get_label().get_text().endswith("miss: IoU 0.00")


@pytest.fixture(scope="module")
def retrieval_spec(tmp_path_factory) -> str:
    text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("grounding-figure"), variant="retrieval")
    return f"albef:{text_dir}@{checkpoint}"


@pytest.fixture(scope="module")
def shifted_encoder(retrieval_spec, tmp_path_factory):
    return write_shifted_encoder(retrieval_spec, tmp_path_factory.mktemp("encoder") / "vision.safetensors", seed=7)


def test_panels_are_the_evaluations_decision_on_each_encoders_own_attack(retrieval_spec, shifted_encoder):
    from platform.evaluate import load_evaluated_model
    from trainables.attacks.word_candidates import OFFLINE, candidate_source
    from trainables.evaluation.grounding_eval import UnimodalCls

    base = load_evaluated_model(parse_model_spec(retrieval_spec), None, torch.device("cpu"))
    tuned = load_evaluated_model(parse_model_spec(retrieval_spec), shifted_encoder, torch.device("cpu"))
    dataset = load_dataset(parse_data_spec("synthetic-vg:test,n=3"), base.image_size)
    candidates = candidate_source(OFFLINE, UnimodalCls(base), torch.device("cpu"))
    panels = grounding_panels({"undefended": base, "tuned": tuned}, dataset, [0, 1, 2], ("pgd", "co-attack"), 4 / 255,
                              candidates=candidates)
    assert len(panels) == 2 * 3 * 3
    for panel in panels:
        item = dataset[panel.pair]
        assert panel.box == tuple(item.box) and panel.iou == pytest.approx(box_iou(item.box, panel.proposals[panel.chosen]))
        assert panel.hit == (panel.iou >= 0.5)
        if panel.attack == "clean":
            model = base if panel.encoder == "undefended" else tuned
            grid_map = grounding_maps(model, item.image.unsqueeze(0), [item.expression])[0]
            # The box the evaluation (batch_hits) would pick, and the same map drawn over the image.
            assert panel.proposals[panel.chosen] == ground(grid_map, item.original_size, item.proposals)
            assert panel.hit == is_hit(item.box, ground(grid_map, item.original_size, item.proposals))
            expected = heat_overlay(item.image.unsqueeze(0), upsample_map(grid_map.unsqueeze(0), tuple(item.image.shape[-2:])))[0]
            assert torch.allclose(panel.picture, expected, atol=1e-5)
            assert panel.expression == item.expression and panel.changed == []
        if panel.attack == "co-attack":
            assert panel.changed == [i for i, (a, b) in enumerate(zip(item.expression.split(), panel.expression.split())) if a != b]
    # White-box per encoder: the two encoders' PGD images differ.
    pgd = {p.encoder: p.picture for p in panels if p.attack == "pgd" and p.pair == 0}
    assert not torch.equal(pgd["undefended"], pgd["tuned"])
    figure = draw_grounding_panels(panels, "test")
    assert len(figure.axes) == 18 and [a.get_title() for a in figure.axes[:3]] == ["undefended\nclean", "undefended\npgd 4/255",
                                                                                   "undefended\nco-attack 4/255"]


def test_the_cli_draws_grounding_with_one_column_per_encoder_and_attack(retrieval_spec, shifted_encoder, tmp_path, capsys):
    out = tmp_path / "grounding.png"
    assert main(["--task", "grounding", "--model", retrieval_spec, "--encoder", f"MAVA={shifted_encoder}",
                 "--data", "synthetic-vg:test,n=6", "--attacks", "pgd", "--eps", "2/255", "--pairs", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    width, height = Image.open(out).size
    assert width >= 600 and height > 400  # 4 columns (2 encoders x clean, pgd), 2 rows
    captured = capsys.readouterr()
    assert "2 expressions x (clean + pgd) x 2 encoders" in captured.err and "hits:" in captured.err
    assert "MAVA" in captured.out  # the map-agreement table


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", "synthetic-ve:test,n=6"], "draws referring expressions with boxes, but 'synthetic-ve:test,n=6' is synthetic-ve data"),
    (["--attacks", "sga"], "grounding is drawn under pgd, co-attack"),
], ids=["entailment-data", "sga"])
def test_bad_grounding_figure_input_is_one_clear_message(retrieval_spec, tmp_path, arguments, message):
    defaults = {"--task": "grounding", "--model": retrieval_spec, "--data": "synthetic-vg:test,n=3",
                "--out": str(tmp_path / "f.png"), "--word-candidates": "offline"}
    given = dict(zip(arguments[::2], arguments[1::2]))
    with pytest.raises(UserError, match=message):
        main([part for key, value in {**defaults, **given}.items() for part in (key, value)])


def test_a_checkpoint_without_itm_head_is_refused_for_grounding(tmp_path):
    spec = write_tiny_albef_ve_spec(tmp_path)
    with pytest.raises(UserError, match="cannot ground expressions"):
        main(["--task", "grounding", "--model", spec, "--data", "synthetic-vg:test,n=3", "--attacks", "pgd",
              "--out", str(tmp_path / "f.png")])


def test_gradcam_layer_belongs_to_grounding(tmp_path):
    with pytest.raises(UserError, match="--gradcam-layer applies to --task grounding"):
        main(["--model", "tiny-albef-ve", "--data", "synthetic-ve:test,n=3", "--gradcam-layer", "2", "--out", str(tmp_path / "f.png")])
