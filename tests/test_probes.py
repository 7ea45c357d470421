"""Linear probes of the synthetic world's attributes: they read what a feature holds, and only that."""

from __future__ import annotations

import numpy as np
import torch

from platform.probe import main
from trainables.data.synthetic import SyntheticWorld
from trainables.evaluation.probes import ATTRIBUTES, attribute_labels, probe, probe_attributes


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
