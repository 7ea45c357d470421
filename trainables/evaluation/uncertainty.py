"""How sure a recall is: per-query ranks of a final evaluation, seed spread, and a bootstrap over test images.

The final evaluation of a retrieval trial stores, per attack × eps, the pessimistic
rank of every image (TR) and of every caption (IR) in one small Parquet file
(:data:`RANKS_SCHEMA`, ``eval_ranks.parquet`` beside the checkpoint; int32 ranks,
zstd: ~20 KB for 500 images, 2,500 captions and three attack × eps cells). From it the comparison computes, with pure functions:

* :func:`mean_std`: mean and sample standard deviation (``ddof=1``) of one cell over
  the seeds of a configuration (no standard deviation with a single seed);
* :func:`bootstrap_recall_interval`: the percentile bootstrap 95% interval of the
  seed-mean recall@K over *test images*. Each of ``resamples`` (1000) draws picks
  I images with replacement (numpy ``default_rng(seed)``, seed 0: deterministic);
  TR@K of a draw is the share of drawn images whose best ground-truth caption ranks
  below K; IR@K of a draw takes every caption of every drawn image (an image drawn
  twice brings its captions twice), so captions are resampled in their image's
  group, never apart from it. The same draw is applied to every seed's ranks (the
  seeds share the test set) and the seeds' recalls averaged; the interval is the
  2.5th and 97.5th percentiles of those means. It measures the test set's sampling
  noise, not the seeds' spread, which :func:`mean_std` reports beside it.
* :func:`paired_difference`: the seed-mean recall of configuration A minus that of B,
  and its *paired* percentile bootstrap interval: every draw resamples the test images
  once and scores both configurations on the same draw, so the noise they share (an
  easy or hard test set) cancels. Two configurations whose separate intervals overlap
  can still differ reliably; the interval of the difference is what says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TR, IR = "tr", "ir"  # the two directions: ranks of images (text retrieval), ranks of captions (image retrieval)
RANKS_SCHEMA = pa.schema([
    ("attack", pa.string()),  # "clean" or the attack's name
    ("eps", pa.float64()),  # pixel units; null for clean
    ("direction", pa.string()),  # TR (one row per image) or IR (one row per caption)
    ("image", pa.int32()),  # the query's image: itself for TR, the caption's image for IR
    ("rank", pa.int32()),  # pessimistic rank of the ground truth; a hit at K when rank < K
])
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class QueryRanks:
    """The ranks of one attack × eps: ``image_ranks`` (I,), ``caption_ranks`` (T,), ``caption_image`` (T,)."""

    attack: str
    eps: float | None
    image_ranks: np.ndarray
    caption_ranks: np.ndarray
    caption_image: np.ndarray


def write_ranks(path: Path, runs: list[QueryRanks]) -> Path:
    """Write the ranks of every attack × eps to one Parquet file (ranks past int32 clipped: misses at any K)."""
    columns: dict[str, list] = {name: [] for name in RANKS_SCHEMA.names}
    for run in runs:
        for direction, ranks, images in ((TR, run.image_ranks, np.arange(len(run.image_ranks))),
                                         (IR, run.caption_ranks, run.caption_image)):
            columns["attack"] += [run.attack] * len(ranks)
            columns["eps"] += [run.eps] * len(ranks)
            columns["direction"] += [direction] * len(ranks)
            columns["image"].append(np.asarray(images, dtype=np.int32))
            columns["rank"].append(np.minimum(np.asarray(ranks, dtype=np.int64), _INT32_MAX).astype(np.int32))
    for name in ("image", "rank"):
        columns[name] = np.concatenate(columns[name]) if columns[name] else np.zeros(0, np.int32)
    pq.write_table(pa.table(columns, schema=RANKS_SCHEMA), path, compression="zstd")
    return path


def read_ranks(path: Path | str) -> dict[tuple[str, float | None], QueryRanks]:
    """The ranks written by :func:`write_ranks`, keyed by (attack, eps)."""
    table = pq.read_table(path, schema=RANKS_SCHEMA)
    attacks = table.column("attack").to_pylist()
    eps_values = table.column("eps").to_pylist()
    is_tr = np.asarray(table.column("direction").to_pylist()) == TR
    images, ranks = table.column("image").to_numpy(), table.column("rank").to_numpy()
    keys = list(zip(attacks, eps_values))
    found = {}
    for key in dict.fromkeys(keys):  # in the order written
        rows = np.fromiter((k == key for k in keys), dtype=bool, count=len(keys))
        tr, ir = rows & is_tr, rows & ~is_tr
        found[key] = QueryRanks(key[0], key[1], ranks[tr], ranks[ir], images[ir])
    return found


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the deviation is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _recalls_of_draws(ranks: QueryRanks, direction: str, k: int, draws: np.ndarray) -> np.ndarray:
    """Recall@k (percent) of each draw (rows of ``draws``: image indices) for one seed's ranks."""
    num_images = len(ranks.image_ranks)
    if direction == TR:
        return 100.0 * (ranks.image_ranks < k)[draws].mean(axis=1)
    # IR: per image, its captions' hits and count; a draw sums them over its drawn images.
    hits = np.bincount(ranks.caption_image, weights=(ranks.caption_ranks < k).astype(float), minlength=num_images)
    counts = np.bincount(ranks.caption_image, minlength=num_images).astype(float)
    return 100.0 * hits[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1.0)


def bootstrap_recall_interval(seeds: list[QueryRanks], direction: str, k: int = 1, resamples: int = RESAMPLES,
                              rng_seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the seed-mean recall@k, resampling test images (module docstring).

    Args:
        seeds: one :class:`QueryRanks` per seed of the configuration, all on the same test images.
        direction: :data:`TR` or :data:`IR`.
    Returns:
        (low, high) in percent.
    """
    if not seeds:
        raise ValueError("bootstrap of no seeds")
    num_images = len(seeds[0].image_ranks)
    if any(len(s.image_ranks) != num_images for s in seeds) or num_images == 0:
        raise ValueError(f"the seeds' ranks cover different or no test images ({[len(s.image_ranks) for s in seeds]})")
    draws = np.random.default_rng(rng_seed).integers(0, num_images, size=(resamples, num_images))
    means = np.mean([_recalls_of_draws(s, direction, k, draws) for s in seeds], axis=0)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def recall_of(ranks: QueryRanks, direction: str, k: int = 1) -> float:
    """Recall@k (percent) of all the queries, as the evaluation computes it (for checks against the metrics)."""
    chosen = ranks.image_ranks if direction == TR else ranks.caption_ranks
    return 100.0 * float((chosen < k).mean())


@dataclass(frozen=True)
class PairedDifference:
    """Seed-mean recall of A minus B (percent points), its paired bootstrap interval, and the draws' share with A > B."""

    difference: float
    interval: tuple[float, float]
    share_a_better: float


def paired_difference(a_seeds: list[QueryRanks], b_seeds: list[QueryRanks], direction: str, k: int = 1,
                      resamples: int = RESAMPLES, rng_seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> PairedDifference:
    """A minus B on the same test images: the paired percentile bootstrap (module docstring).

    Args:
        a_seeds, b_seeds: one :class:`QueryRanks` per seed of each configuration, all on the same test images.
        direction: :data:`TR` or :data:`IR`.
    """
    if not a_seeds or not b_seeds:
        raise ValueError("a paired difference needs ranks of at least one seed on each side")
    sizes = {len(s.image_ranks) for s in a_seeds + b_seeds}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"the two configurations' ranks cover different or no test images ({sorted(sizes)}): compare runs "
                         "evaluated on the same test set")
    num_images = sizes.pop()
    draws = np.random.default_rng(rng_seed).integers(0, num_images, size=(resamples, num_images))
    def seed_mean(seeds: list[QueryRanks], rows: np.ndarray) -> np.ndarray:
        return np.mean([_recalls_of_draws(s, direction, k, rows) for s in seeds], axis=0)

    differences = seed_mean(a_seeds, draws) - seed_mean(b_seeds, draws)
    everything = np.arange(num_images)[None, :]  # the test set itself: the observed difference
    observed = float((seed_mean(a_seeds, everything) - seed_mean(b_seeds, everything))[0])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(differences, [tail, 100.0 - tail])
    return PairedDifference(observed, (float(low), float(high)), float((differences > 0).mean()))
