"""The one error type users see: the CLI prints its message as a single line and exits non-zero."""


class UnsparseError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""


def check_fraction(name: str, value: float, *, upper_inclusive: bool = True) -> float:
    """Reject a sparsity/threshold outside [0, 1] (or [0, 1) when upper_inclusive is False)."""
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise UnsparseError(f"{name} must be in {bound}, got {value}")
    return value
