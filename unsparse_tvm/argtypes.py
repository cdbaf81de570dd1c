"""argparse types for the CLI's options: each refuses a malformed value at parse time, in one line, before
any model is loaded. (Imported by the parser itself, so nothing here may import torch or TVM.)"""

from __future__ import annotations

import argparse
import os

from .errors import MAX_SPARSITY, UnsparseError, check_fraction


def _number(name: str, text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got '{text}'") from None


def fraction(name: str, upper_inclusive: bool = True, upper: float = 1.0):
    """A number in [0, upper] (or [0, upper) when upper_inclusive is False)."""
    bound = f"[0, {upper:g}]" if upper_inclusive else f"[0, {upper:g})"

    def parse(text: str) -> float:
        value = _number(name, text, float, f"a number in {bound}")
        try:
            return check_fraction(name, value, upper_inclusive=upper_inclusive, upper=upper)
        except UnsparseError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def sparsity(name: str = "sparsity"):
    """A sparsity in [0, MAX_SPARSITY]: a layer pruned further is cut out of the network."""
    return fraction(name, upper=MAX_SPARSITY)


INT_MAX = 2**31 - 1  # what torch's and TVM's sizes and loops take; beyond it they fail deep inside


def whole(name: str, lowest: int = 1, highest: int = INT_MAX):
    """A whole number in [lowest, highest]."""
    def parse(text: str) -> int:
        value = _number(name, text, int, "a whole number")
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"{name} must be at least {lowest}, got {value}" if value < lowest else
                                             f"{name} must be at most {highest}, got {value}")
        return value

    return parse


def positive_int(name: str):
    return whole(name, 1)


def positive_number(name: str):
    """A number above 0 (a speedup above 1 is checked where it is used: the message says why)."""
    def parse(text: str) -> float:
        value = _number(name, text, float, "a number")
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got '{text}'")
        return value

    return parse


def seed(text: str) -> int:
    return whole("--seed", 0, 2**32 - 1)(text)


def learning_rate(text: str) -> float:
    value = _number("--lr", text, float, "a positive number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"--lr must be a positive number, got {text}")
    return value


def one_of(name: str, values: tuple):
    """One of `values` (compared as written; ints parsed first when the values are ints)."""
    def parse(text: str):
        value = _number(name, text, int, "a whole number") if isinstance(values[0], int) else text
        if value not in values:
            raise argparse.ArgumentTypeError(f"{name} must be one of {', '.join(map(str, values))}, got '{text}'")
        return value

    return parse


DATASETS_HELP = "digits (sklearn's bundled 8x8 digits) or cifar10:PATH (folder with data_batch_1..5 and test_batch)"


def dataset(random_allowed: bool = False):
    """digits | cifar10:PATH (an existing folder) | random (quantize's calibration only)."""
    def parse(text: str) -> str:
        if text == "digits" or (random_allowed and text == "random"):
            return text
        if text == "cifar10" or text == "cifar10:":
            raise argparse.ArgumentTypeError("cifar10 needs a folder: --dataset cifar10:PATH (the extracted "
                                             "cifar-10-batches-py)")
        if text.startswith("cifar10:"):
            if not os.path.isdir(text[len("cifar10:"):]):
                raise argparse.ArgumentTypeError(f"CIFAR-10 folder {text[len('cifar10:'):]} does not exist")
            return text
        raise argparse.ArgumentTypeError(f"unknown data set '{text}': use {DATASETS_HELP}"
                                         + (" or random" if random_allowed else ""))

    return parse


def thread_list(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 1024:
        raise argparse.ArgumentTypeError("--threads takes positive thread counts separated by commas, e.g. 1,2; "
                                         f"got '{text}'")
    return counts


def peer_list(text: str) -> list[str]:
    from .peers import OURS, PEERS  # torch-free: names only

    names = [t for t in text.split(",") if t]
    bad = [t for t in names if t not in PEERS + OURS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown peer '{(bad or [text])[0]}': use {', '.join(PEERS + OURS)}")
    return names
