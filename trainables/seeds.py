"""One seed-derivation helper: every random stream of a run is a function of the run's seed and its position.

Each stream (the attack noise of a training epoch, the attack of one evaluation
batch, an honesty check) mixes the user's seed with small
integers (epoch, rank, batch, run index) by one formula::

    seed * stream.seed_stride + stream.offset + major * stream.major_stride + minor

The strides are primes, so nearby positions of different streams do not share a seed.
The constants are the ones the loop and the evaluation used before this helper
existed: the embedded default's numbers did not change (``tests/test_names.py``
checks the values against the old formulas). The data order of a training epoch is
``DistributedSampler``'s (seed, epoch), one replica or several: no stream of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeedStream:
    """How one stream mixes (seed, major, minor) into a generator seed."""

    seed_stride: int
    major_stride: int
    offset: int = 0


# Attack noise of training epoch ``major`` on DDP rank ``minor`` (resume replays it exactly).
TRAIN_ATTACK = SeedStream(seed_stride=1_000_003, major_stride=1_009)
# The attack on evaluation batch ``major`` for (attack, eps) run number ``minor``: each cell is reproducible alone.
EVAL_ATTACK = SeedStream(seed_stride=1_000_003, major_stride=7_919)
# The honesty checks' PGD at eps number ``major`` (one generator shared by its short and long runs).
HONESTY_CHECK = SeedStream(seed_stride=1_000_003, major_stride=1, offset=104_729)
# The attacks of the adversarial-example pictures, (attack, eps) run number ``major``.
EXAMPLES = SeedStream(seed_stride=1_000_003, major_stride=1, offset=1_299_709)


def derive_seed(seed: int, stream: SeedStream, major: int, minor: int = 0) -> int:
    """The generator seed of position (``major``, ``minor``) of ``stream`` in a run seeded with ``seed``."""
    return seed * stream.seed_stride + stream.offset + major * stream.major_stride + minor
