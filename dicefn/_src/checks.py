"""Input validation shared by the public functions.

Every check here reads only static properties (types, dtypes and shapes), never tensor
values, so it runs unchanged under ``torch.func`` transforms and ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """Raises ``TypeError`` unless ``x`` is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    return x


def check_floating(x: Any, name: str) -> torch.Tensor:
    """Raises ``TypeError`` unless ``x`` is a floating-point tensor."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    return x


def check_integer(x: Any, name: str) -> torch.Tensor:
    """Raises ``TypeError`` unless ``x`` is an integer tensor (not bool, not float)."""
    check_tensor(x, name)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor (e.g. torch.int64), got dtype {x.dtype}."
        )
    return x


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype log-probabilities are computed in: float32 for half-precision inputs."""
    return torch.float32 if x.dtype in HALF_DTYPES else x.dtype


def broadcast_shapes(what: str, **shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` with a ``ValueError`` that names every shape."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"{what}: shapes do not broadcast: {listed}.") from None
