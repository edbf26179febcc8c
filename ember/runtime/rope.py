"""Rotary position embeddings: the cos/sin tables of a run of positions, and the rotation of
the reference forward (the fused step applies the same tables in its own loops)."""

from __future__ import annotations

import numpy as np

from .config import ROPE_NEOX


def rope_tables(positions: np.ndarray, dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, dim/2] of position * base^(-2j/dim), computed in float64."""
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate the first 2*cos.shape[1] dims of x [n, heads, head_dim]."""
    d = 2 * cos.shape[1]
    out = x.copy()
    c, s = cos[:, None, :], sin[:, None, :]
    if style == ROPE_NEOX:
        a, b = x[..., : d // 2], x[..., d // 2 : d]
        out[..., : d // 2] = a * c - b * s
        out[..., d // 2 : d] = a * s + b * c
    else:
        a, b = x[..., 0:d:2], x[..., 1:d:2]
        out[..., 0:d:2] = a * c - b * s
        out[..., 1:d:2] = a * s + b * c
    return out
