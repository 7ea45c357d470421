"""Projection onto the L-inf ball and the pixel box, exact in floating point.

``clamp(x + delta, 0, 1) - x`` can exceed eps by one ulp after rounding; the
contract ``||x_adv - x||_inf <= eps`` must hold *exactly*, so the few entries that
overshoot are stepped back towards ``x`` with ``nextafter``.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def representable_eps(eps: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is <= eps (``float32(4/255)`` rounds *up* otherwise).

    A Python float, exactly representable in ``dtype``, so arithmetic with a tensor of that
    dtype uses it unchanged. Not a device tensor: copying one to a GPU on every projection was
    a host-device synchronisation per PGD step (found by tests/test_gpu.py on an H200).
    """
    value = torch.tensor(eps, dtype=dtype)
    return float(torch.nextafter(value, torch.zeros_like(value)) if float(value) > eps else value)


CORRECTIONS = 4  # one or two nextafter steps always suffice; bounded for safety


def project_linf(candidate: torch.Tensor, original: torch.Tensor, eps: float, early_exit: bool | None = None) -> torch.Tensor:
    """The point of ``[original - eps, original + eps] ∩ [0, 1]`` nearest ``candidate`` (entrywise).

    Args:
        early_exit: stop correcting once no entry overshoots. Checking that reads a value back
            from the device (``bool(over.any())``), which on a GPU stalls the host until every
            queued kernel has run, once per PGD step. None = only on CPU, where it is free; on
            other devices all ``CORRECTIONS`` rounds run unconditionally. Both give the same
            tensor: a round changes only entries that overshoot, so rounds after the last
            overshoot are no-ops.
    """
    eps = representable_eps(float(eps), candidate.dtype)
    projected = torch.maximum(torch.minimum(candidate, original + eps), original - eps).clamp(0.0, 1.0)
    if early_exit is None:
        early_exit = projected.device.type == "cpu"
    for _ in range(CORRECTIONS):
        over = (projected - original).abs() > eps
        if early_exit and not bool(over.any()):
            return projected
        projected = torch.where(over, torch.nextafter(projected, original), projected)
    return projected


def random_start(images: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A uniform point of the eps-ball around ``images``, inside [0, 1] (PGD's random start)."""
    noise = torch.rand(images.shape, generator=generator, device=generator.device, dtype=images.dtype).to(images.device)
    return project_linf(images + (2 * noise - 1) * eps, images, eps)
