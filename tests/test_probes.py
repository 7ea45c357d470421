"""Linear probes of the synthetic world's attributes: they read what a feature holds, and only that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from albef_fakes import write_tiny_albef
from platform.probe import main
from trainables.data.synthetic import COLOURS, SyntheticWorld
from trainables.data.synthetic_vg import SyntheticGrounding
from trainables.errors import UserError
from trainables.evaluation.probes import (ATTRIBUTES, PATCH_CLASSES, attribute_labels, patch_colour_labels, probe, probe_attributes,
                                          probe_patch_colour)


def test_attribute_labels_name_each_scenes_value():
    world = SyntheticWorld("test", 20, seed=0)
    labels = attribute_labels(world.scenes)
    for name, values in ATTRIBUTES.items():
        assert [values[i] for i in labels[name]] == [getattr(scene, name) for scene in world.scenes]


def test_a_probe_reads_an_attribute_the_feature_holds_and_not_one_it_lacks():
    train, test = SyntheticWorld("train", 600, seed=0), SyntheticWorld("test", 300, seed=0)
    generator = torch.Generator().manual_seed(0)

    def features(scenes):  # the colour one-hot plus noise: colour is in the feature, position is not
        colour = torch.tensor(attribute_labels(scenes)["colour"])
        return torch.nn.functional.one_hot(colour, len(ATTRIBUTES["colour"])).float() + 0.1 * torch.randn(len(scenes), len(ATTRIBUTES["colour"]), generator=generator)

    results = probe_attributes(features(train.scenes), train.scenes, features(test.scenes), test.scenes)
    assert results["colour"].accuracy == 100.0
    assert results["position"].accuracy < results["position"].chance + 10  # chance: the majority class, 20-30% here
    assert list(results) == list(ATTRIBUTES)


def test_chance_is_the_test_splits_majority_class():
    labels = np.array([0, 0, 0, 1])
    result = probe(torch.zeros(4, 2), labels, torch.zeros(4, 2), labels)
    assert result.chance == 75.0 and result.accuracy == 75.0  # constant features: the probe predicts the majority


def test_the_command_prints_both_features_probes_for_every_attribute(random_tiny_clip_weights, capsys):
    assert main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--train", "60", "--test", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["feature", *ATTRIBUTES]
    assert [line.split()[0] for line in lines[2:]] == ["chance", "image", "text"]
    assert all(0.0 <= float(cell) <= 100.0 for line in lines[2:] for cell in line.split()[1:])


def test_a_patch_is_the_object_colour_covering_most_of_it_if_enough_pixels_do():
    background, red, blue = (245, 245, 245), COLOURS["red"], COLOURS["blue"]
    image = torch.tensor(background, dtype=torch.uint8).view(3, 1, 1).repeat(1, 8, 8)
    image[:, :4, :4] = torch.tensor(red, dtype=torch.uint8).view(3, 1, 1)  # patch 0: all red
    image[:, 0, 4:7] = torch.tensor(red, dtype=torch.uint8).view(3, 1)  # patch 1: 3 red pixels (an edge)
    image[:, 4, 0:4] = torch.tensor(red, dtype=torch.uint8).view(3, 1)  # patch 2: 4 red and 6 blue pixels
    image[:, 5:7, 0:3] = torch.tensor(blue, dtype=torch.uint8).view(3, 1, 1)
    labels = patch_colour_labels(image[None], patch_size=4)
    assert [PATCH_CLASSES[k] for k in labels[0]] == ["red", "background", "blue", "background"]
    assert (patch_colour_labels(image[None].float() / 255, patch_size=4) == labels).all()  # [0, 1] floats alike


def _scene_tokens(labels: np.ndarray, local: bool, seed: int) -> torch.Tensor:
    """(N, patches, classes) tokens: each patch's own one-hot colour (local) or the image's mean of them (mixed), plus noise."""
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), len(PATCH_CLASSES)).float()
    tokens = one_hot if local else one_hot.mean(1, keepdim=True).expand_as(one_hot)
    return tokens + 0.01 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("local", [True, False])
def test_the_patch_probe_reads_a_local_token_from_its_own_patch_only(local):
    train, test = SyntheticGrounding("train", 200), SyntheticGrounding("test", 100)
    train_labels, test_labels = patch_colour_labels(train.images, 4), patch_colour_labels(test.images, 4)
    results = probe_patch_colour(_scene_tokens(train_labels, local, 0), train_labels, _scene_tokens(test_labels, local, 1), test_labels)
    if local:
        assert results["own"].accuracy > 99.0 and results["other"].accuracy < results["own"].accuracy - 20
    else:  # a token that mixed the scene says the same from every patch: own and other cannot differ by much
        assert abs(results["own"].accuracy - results["other"].accuracy) < 10 and results["own"].accuracy < 90
    assert results["own"].chance < 35  # six colours, roughly balanced


def test_the_command_probes_an_albef_vits_patch_tokens(tmp_path, capsys):
    text_dir, checkpoint = write_tiny_albef(tmp_path)
    assert main(["--model", f"albef:{text_dir}@{checkpoint}", "--patches", "--train", "40", "--test", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "object patches of 8 px" in lines[0]
    assert [line.rsplit(maxsplit=1)[0] for line in lines[1:]] == ["chance", "own patch's token", "another patch's token, same image"]
    assert all(0.0 <= float(line.split()[-1]) <= 100.0 for line in lines[1:])


def test_patch_probes_of_a_model_without_patch_tokens_say_what_to_use(random_tiny_clip_weights):
    with pytest.raises(UserError, match="no patch tokens.*drop --patches"):
        main(["--model", f"tiny-clip@{random_tiny_clip_weights}", "--patches", "--train", "10", "--test", "10"])
