"""Optuna samplers that survive Ray Tune's pickling.

Ray Tune pickles its searcher (``OptunaSearch`` and the sampler inside it) every
time it saves the experiment state, and unpickles it on ``--resume``. Optuna 5.1's
genetic-algorithm samplers (``NSGAIISampler``) hold a ``threading.Lock`` in
``_thread_lock`` and define no ``__getstate__``, so pickling them raises
``TypeError: cannot pickle '_thread.lock' object`` and every ``nsga2`` sweep
crashed. :class:`PicklableNSGAIISampler` drops the lock from its pickled state and
makes a fresh one on load: a lock guards a process's own threads and means nothing
in another process, so nothing is lost. On Optuna 5.0, which has no lock, the
subclass behaves exactly as ``NSGAIISampler``.

TPE and random samplers pickle as they are; they need no wrapper.
"""

from __future__ import annotations

import threading
from typing import Any

from optuna.samplers import NSGAIISampler

_LOCK_ATTRIBUTE = "_thread_lock"


class PicklableNSGAIISampler(NSGAIISampler):
    """``NSGAIISampler`` whose pickled state leaves out its thread lock (recreated on load)."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop(_LOCK_ATTRIBUTE, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Optuna 5.1+ reads the lock in _sync_generation_cache; on 5.0 the attribute is unused.
        setattr(self, _LOCK_ATTRIBUTE, threading.Lock())


# Optuna's GA base class derives the study attribute keys it stores per trial from the class
# name (``__init_subclass__``): keep NSGAIISampler's keys, so that a study written by either
# class reads the same generations and parents.
PicklableNSGAIISampler._GENERATION_KEY = NSGAIISampler._GENERATION_KEY
PicklableNSGAIISampler._PARENT_CACHE_KEY_PREFIX = NSGAIISampler._PARENT_CACHE_KEY_PREFIX
