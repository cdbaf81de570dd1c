"""The one error type users see: the CLI prints its message as a single line and exits non-zero; and the
range checks every entry point shares."""

# The highest sparsity a layer (and so the model) is pruned to: further, a layer is all but cut out of
# the network (compress.masks caps every layer there).
MAX_SPARSITY = 0.99


class UnsparseError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""


def check_fraction(name: str, value: float, *, upper_inclusive: bool = True, upper: float = 1.0) -> float:
    """Reject a value outside [0, upper] (or [0, upper) when upper_inclusive is False)."""
    ok = 0.0 <= value <= upper if upper_inclusive else 0.0 <= value < upper
    if not ok:
        bound = f"[0, {upper:g}]" if upper_inclusive else f"[0, {upper:g})"
        raise UnsparseError(f"{name} must be in {bound}, got {value}")
    return value


def check_sparsity(name: str, value: float) -> float:
    """A sparsity must be in [0, MAX_SPARSITY]."""
    return check_fraction(name, value, upper=MAX_SPARSITY)
