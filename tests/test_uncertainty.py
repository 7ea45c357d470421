"""Seed spread and bootstrap intervals over test images (trainables/evaluation/uncertainty.py), on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.evaluation.uncertainty import (IR, TR, QueryRanks, bootstrap_recall_interval, mean_std, paired_difference, read_ranks,
                                               recall_of, write_ranks)


def ranks(image_hits: list[bool], caption_hits: list[bool], caption_image: list[int], attack: str = "clean",
          eps: float | None = None) -> QueryRanks:
    """Ranks giving these hits at K=1 (a hit: rank 0; a miss: rank 3)."""
    as_ranks = lambda hits: np.where(np.asarray(hits), 0, 3).astype(np.int32)
    return QueryRanks(attack, eps, as_ranks(image_hits), as_ranks(caption_hits), np.asarray(caption_image, dtype=np.int32))


def test_mean_and_sample_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1
    assert mean_std([40.0, 44.0]) == (42.0, pytest.approx(2 ** 1.5))  # sqrt(8)
    assert mean_std([5.0]) == (5.0, None)  # one seed: no spread to report
    with pytest.raises(ValueError):
        mean_std([])


def test_all_hits_and_all_misses_have_degenerate_intervals():
    perfect = ranks([True] * 5, [True] * 10, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    hopeless = ranks([False] * 5, [False] * 10, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    for direction in (TR, IR):
        assert bootstrap_recall_interval([perfect], direction) == (100.0, 100.0)
        assert bootstrap_recall_interval([hopeless], direction) == (0.0, 0.0)


def test_interval_contains_the_recall_is_deterministic_and_narrows_with_more_images():
    rng = np.random.default_rng(7)
    small = ranks(list(rng.random(20) < 0.5), list(rng.random(40) < 0.5), list(np.repeat(np.arange(20), 2)))
    low, high = bootstrap_recall_interval([small], TR)
    assert low < recall_of(small, TR) < high
    assert bootstrap_recall_interval([small], TR) == (low, high)  # fixed RNG seed
    assert bootstrap_recall_interval([small], TR, rng_seed=1) != (low, high)  # the seed is what fixes it
    big = ranks(list(rng.random(2000) < 0.5), list(rng.random(4000) < 0.5), list(np.repeat(np.arange(2000), 2)))
    big_low, big_high = bootstrap_recall_interval([big], TR)
    assert big_high - big_low < (high - low) / 3  # 100x the images: ~10x narrower
    # Normal approximation for 2000 Bernoulli(~0.5) images: half-width ~1.96 * sqrt(.25 / 2000) * 100 = 2.2 points.
    assert (big_high - big_low) / 2 == pytest.approx(2.2, abs=0.4)


def test_image_retrieval_resamples_captions_with_their_image():
    # Image 0's two captions both hit, image 1's both miss: every caption draw follows its image, so a
    # draw's IR@1 is the share of drawn images that are image 0, a multiple of 50 with 2 images.
    grouped = ranks([True, False], [True, True, False, False], [0, 0, 1, 1])
    draws_low, draws_high = bootstrap_recall_interval([grouped], IR)
    assert (draws_low, draws_high) == (0.0, 100.0)
    # Resampling captions apart from their image would give quarters; the per-draw recalls here are halves.
    from trainables.evaluation.uncertainty import _recalls_of_draws

    values = _recalls_of_draws(grouped, IR, 1, np.random.default_rng(0).integers(0, 2, size=(200, 2)))
    assert set(np.unique(values)) <= {0.0, 50.0, 100.0}


def test_seeds_share_each_draw_of_images():
    # Two seeds with opposite hits: whatever images a draw picks, the seeds' mean TR@1 is exactly 50.
    first = ranks([True, False, True, False], [True] * 4, [0, 1, 2, 3])
    second = ranks([False, True, False, True], [True] * 4, [0, 1, 2, 3])
    assert bootstrap_recall_interval([first, second], TR) == (50.0, 50.0)
    with pytest.raises(ValueError, match="different"):
        bootstrap_recall_interval([first, ranks([True], [True], [0])], TR)


def test_a_paired_difference_cancels_the_noise_both_configurations_share():
    # B hits a random half of 200 images; A hits the same images and 10 more (5 points better everywhere).
    rng = np.random.default_rng(3)
    b_hits = rng.random(200) < 0.5
    a_hits = b_hits.copy()
    a_hits[np.flatnonzero(~b_hits)[:10]] = True
    captions = list(np.repeat(np.arange(200), 2))
    a, b = ranks(list(a_hits), list(np.repeat(a_hits, 2)), captions), ranks(list(b_hits), list(np.repeat(b_hits, 2)), captions)
    paired = paired_difference([a], [b], TR)
    assert paired.difference == pytest.approx(5.0)
    # Separately, the two intervals overlap (each is about +-7 points wide) ...
    (a_low, a_high), (b_low, b_high) = bootstrap_recall_interval([a], TR), bootstrap_recall_interval([b], TR)
    assert a_low < b_high
    # ... but on the same draws A is never worse: the paired interval excludes 0 and every draw favours A.
    assert 0 < paired.interval[0] <= 5.0 <= paired.interval[1] and paired.share_a_better == 1.0
    # The oracle: the same draws (default_rng(0), 1000 x 200), A's hit share minus B's, percentiles 2.5 and 97.5.
    draws = np.random.default_rng(0).integers(0, 200, size=(1000, 200))
    expected = np.percentile(100.0 * (a_hits[draws].mean(axis=1) - b_hits[draws].mean(axis=1)), [2.5, 97.5])
    assert paired.interval == pytest.approx(tuple(expected))
    assert paired_difference([a], [b], IR).difference == pytest.approx(5.0)


def test_a_paired_difference_of_equal_configurations_is_exactly_zero_and_refuses_other_test_sets():
    same = ranks([True, False, True], [True, False, False], [0, 1, 2])
    assert paired_difference([same, same], [same], TR) == paired_difference([same], [same], TR)
    result = paired_difference([same], [same], TR)
    assert (result.difference, result.interval, result.share_a_better) == (0.0, (0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match="different or no test images"):
        paired_difference([same], [ranks([True], [True], [0])], TR)


def test_ranks_file_round_trips_every_attack_and_eps(tmp_path):
    clean = ranks([True, False, True], [True, False, False, True, True, True], [0, 0, 1, 1, 2, 2])
    attacked = ranks([False, False, True], [False] * 6, [0, 0, 1, 1, 2, 2], attack="pgd", eps=4 / 255)
    never = QueryRanks("sga", 2 / 255, np.array([np.iinfo(np.int64).max, 0, 1]), np.zeros(6, np.int64), clean.caption_image)
    path = write_ranks(tmp_path / "ranks.parquet", [clean, attacked, never])
    found = read_ranks(path)
    assert list(found) == [("clean", None), ("pgd", 4 / 255), ("sga", 2 / 255)]
    for original in (clean, attacked):
        back = found[(original.attack, original.eps)]
        np.testing.assert_array_equal(back.image_ranks, original.image_ranks)
        np.testing.assert_array_equal(back.caption_ranks, original.caption_ranks)
        np.testing.assert_array_equal(back.caption_image, original.caption_image)
    assert found[("sga", 2 / 255)].image_ranks[0] == np.iinfo(np.int32).max  # a re-ranking miss stays a miss
    assert path.stat().st_size < 4000


def test_the_epoch_evaluation_writes_ranks_that_give_back_its_recalls(pretrained_tiny_clip, tmp_path):
    from trainables.data.synthetic import SyntheticWorld
    from trainables.tasks import EpochEval, Task, task_info

    images = SyntheticWorld("test", 30, image_size=32, seed=0)
    settings = EpochEval(attacks=("pgd",), eps=(4 / 255,), batch_size=30, seed=0, ranks_file=tmp_path / "ranks.parquet")
    metrics = task_info(Task.RETRIEVAL).evaluate(pretrained_tiny_clip, images, settings, False)
    found = read_ranks(settings.ranks_file)
    assert set(found) == {("clean", None), ("pgd", 4 / 255)}
    for (attack, eps), query_ranks in found.items():
        prefix = "clean" if eps is None else f"{attack}/eps4"
        assert len(query_ranks.image_ranks) == 30 and len(query_ranks.caption_ranks) == len(query_ranks.caption_image) > 30
        for k in (1, 5):
            assert recall_of(query_ranks, TR, k) == pytest.approx(metrics[f"{prefix}/tr{k}"])
            assert recall_of(query_ranks, IR, k) == pytest.approx(metrics[f"{prefix}/ir{k}"])
    assert metrics["clean/tr1"] != metrics["pgd/eps4/tr1"]  # two different rank sets, not one written twice
