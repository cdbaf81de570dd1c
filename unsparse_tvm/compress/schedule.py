"""When to prune: the sparsity schedule of gradual pruning while fine-tuning."""

from __future__ import annotations


def cubic_sparsity(step: int, ramp_steps: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - t / (n dt))^3, held at s_f after the ramp."""
    frac = min(1.0, step / max(1, ramp_steps))
    return final + (initial - final) * (1.0 - frac) ** 3
