"""Statistics of interleaved repetitions: medians, spreads and paired ratios.

The benchmark runs ``tcp://`` and ``shm://`` side by side and alternates
their repetitions (tcp, shm, shm, tcp, ...; with a third, each takes each
place in turn), so repetition *i* of one
transport ran next to repetition *i* of the other.  A noisy machine drifts
(other tenants, frequency, page cache), and the drift hits both members of a
pair alike; the median of the per-pair ratios cancels most of it, where the
ratio of two medians would not.  Pure functions, no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["median", "iqr", "paired_ratio", "ratio_of_medians", "interleaved"]


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def iqr(values: Sequence[float]) -> float | None:
    """The interquartile range (0 for one value, None for none)."""
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float | None:
    """The median of ``num[i] / den[i]`` over the pairs with a nonzero
    denominator; None when the sequences differ in length or no pair counts.

    >>> paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    2.0
    """
    if len(num) != len(den):
        return None
    ratios = [a / b for a, b in zip(num, den) if b]
    return statistics.median(ratios) if ratios else None


def ratio_of_medians(num: Sequence[float], den: Sequence[float]) -> float | None:
    """``median(num) / median(den)``, for measurements that were not paired."""
    a, b = median(num), median(den)
    if a is None or not b:
        return None
    return a / b


def interleaved(names: Sequence[str], rep: int) -> list[str]:
    """The order of repetition ``rep``: ``names`` rotated by ``rep``, so that
    each takes each place in turn (for two: forwards, then backwards).

    >>> [interleaved(["tcp", "shm"], i) for i in range(3)]
    [['tcp', 'shm'], ['shm', 'tcp'], ['tcp', 'shm']]
    >>> [interleaved(["a", "b", "c"], i) for i in range(3)]
    [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b']]
    """
    k = rep % len(names) if names else 0
    return [*names[k:], *names[:k]]
