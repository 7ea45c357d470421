"""The ITM binding probe: its expressions mean what it says, and it tells a binding head from a word counter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from albef_fakes import write_tiny_albef
from platform.probe import main
from trainables.data.synthetic import PlacedObject
from trainables.data.synthetic_vg import SyntheticGrounding
from trainables.errors import UserError
from trainables.evaluation.binding import binding_cases, binding_rates


def _scene(*looks: tuple[str, str]):
    return SimpleNamespace(objects=tuple(PlacedObject(shape, colour, "small", (0.5, 0.5)) for colour, shape in looks))


def test_a_rebound_expression_fits_word_by_word_but_no_object():
    cases = binding_cases([
        _scene(("red", "circle"), ("blue", "square")),
        _scene(("red", "circle"), ("red", "square")),  # one colour: nothing to rebind
        _scene(("red", "circle"), ("blue", "square"), ("blue", "circle")),  # "the blue circle" exists: rebind the square
    ])
    assert [case.index for case in cases] == [0, 2]
    assert (cases[0].true, cases[0].rebound) == ("the red circle", "the blue circle")
    assert (cases[1].true, cases[1].rebound) == ("the blue square", "the red square")
    for case in cases:
        assert case.absent.split()[1] not in {"red", "blue"} and case.absent.split()[2] == case.true.split()[2]


class _Stub:
    """An ITM head over scene indices (pixel values): ``binds`` scores exact (colour, shape) looks, else counts fitting words."""

    def __init__(self, scenes, binds: bool):
        self.scenes, self.binds = scenes, binds

    def image_tokens(self, images):
        return images[:, 0, 0, 0].long()

    def itm_pair_logits(self, tokens, texts):
        scores = []
        for index, text in zip(tokens.tolist(), texts):
            _, colour, shape = text.split()
            objects = self.scenes[index].objects
            if self.binds:
                scores.append(float(any((o.colour, o.shape) == (colour, shape) for o in objects)))
            else:
                scores.append(float(any(o.colour == colour for o in objects)) + float(any(o.shape == shape for o in objects)))
        return torch.tensor(scores)


@pytest.mark.parametrize("binds, rebound", [(True, 100.0), (False, 50.0)])
def test_the_rates_tell_a_binding_head_from_a_word_counter(binds, rebound):
    scenes = SyntheticGrounding("test", 60).scenes
    images = torch.arange(len(scenes), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    rates = binding_rates(_Stub(scenes, binds), images, binding_cases(scenes))
    assert rates == {"rebound": rebound, "absent": 100.0}


def test_the_command_probes_an_albef_itm_head(tmp_path, capsys):
    text_dir, checkpoint = write_tiny_albef(tmp_path)
    assert main(["--model", f"albef:{text_dir}@{checkpoint}", "--binding", "--test", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ITM binding probe" in lines[0] and len(lines) == 3
    assert all(0.0 <= float(line.split()[-1]) <= 100.0 for line in lines[1:])


def test_binding_needs_an_itm_head(random_tiny_clip_weights):
    with pytest.raises(UserError, match="no ITM head"):
        main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--binding", "--test", "10"])
