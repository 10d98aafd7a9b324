"""How many leading keys of a prefix chain exist, found in a few waves of probes.

Group *i* of a prompt is only ever written with or after groups ``0..i-1``, so the
stored groups of a chain are (almost always) a prefix of it, and whether key *i*
exists tells on which side of *i* the end lies. :func:`stored_prefix` finds the end
by a k-ary search of at most ``waves`` concurrent waves: each wave probes the keys
that cut the remaining candidates into equal parts, the first one also the first and
the last key, so a miss and a full hit (the common answers) take one wave.
``waves=1`` is a single wave over every key. More waves, fewer requests: the caller
chooses (``docs/lookups.md``).

A hole (a key missing inside the stored run, e.g. expired) can make the answer too
long, never too short: the answer is the chain's length or the index of a key that
was probed and found missing, right after one found present (or 0).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .checks import positive_int

K = TypeVar("K")

#: Probes many keys in one concurrent wave (HEADs, or a LIST per group of head objects):
#: per key what is known of it, ``None`` if missing.
ProbeWave = Callable[[Sequence[K]], Awaitable[Sequence[Any | None]]]


def _fanout(candidates: int, waves: int) -> int:
    """The fewest probes per wave that settle ``candidates`` answers in ``waves`` waves."""
    fanout = 1
    while (fanout + 1) ** waves < candidates:
        fanout += 1
    return min(fanout, candidates - 1)


def _cuts(lo: int, hi: int, fanout: int) -> list[int]:
    """``fanout`` indices in ``[lo, hi)`` splitting the answers ``lo..hi`` into equal parts."""
    candidates = hi - lo + 1
    return [lo - 1 + -(-(j * candidates) // (fanout + 1)) for j in range(1, fanout + 1)]


def _plan(lo: int, hi: int, waves: int, first: bool) -> list[int]:
    """The indices one wave probes when the answer lies in ``lo..hi``, ``waves`` waves left."""
    if waves == 1:
        return list(range(lo, hi))
    ends: list[int] = []
    if first and hi - lo > 1:
        ends, lo, hi = [lo, hi - 1], lo + 1, hi - 1
    inner = _cuts(lo, hi, _fanout(hi - lo + 1, waves)) if hi > lo else []
    return sorted({*ends, *inner})


def worst_case(length: int, waves: int) -> int:
    """The most probes :func:`stored_prefix` sends for a chain of ``length`` keys."""
    return _worst(0, length, _waves_used(length, waves), True)


def _worst(lo: int, hi: int, waves: int, first: bool) -> int:
    # The widest part left after a wave is the most expensive one to settle.
    if lo >= hi:
        return 0
    probes = _plan(lo, hi, waves, first)
    if waves == 1:
        return len(probes)
    bounds = [lo - 1, *probes, hi]
    widest = max(range(len(bounds) - 1), key=lambda j: bounds[j + 1] - bounds[j])
    return len(probes) + _worst(bounds[widest] + 1, bounds[widest + 1], waves - 1, False)


def _waves_used(length: int, waves: int) -> int:
    """The fewest waves, up to ``waves``, that need no more probes than ``waves`` would."""
    useful = min(waves, length.bit_length() + 1)  # beyond it, a binary search: no fewer probes
    costs = {w: _worst(0, length, w, True) for w in range(1, useful + 1)}
    return min(costs, key=lambda w: (costs[w], w))


async def stored_prefix(keys: Sequence[K], probe: ProbeWave[K], waves: int) -> int:
    """How many leading ``keys`` exist, in at most ``waves`` calls of ``probe``.

    ``keys`` may be anything ``probe`` understands, e.g. per group the keys of every
    head a reader needs, answered by one request each. An error from ``probe`` propagates.
    """
    positive_int("waves", waves)
    lo, hi = 0, len(keys)  # the answer lies in lo..hi; keys[hi] was found missing
    found: set[int] = set()
    left = _waves_used(len(keys), waves)
    first = True
    while lo < hi:
        probes = _plan(lo, hi, left, first)
        first, left = False, left - 1
        answers = await probe([keys[i] for i in probes])
        for i, info in zip(probes, answers, strict=True):
            if info is None:
                hi = min(hi, i)
            else:
                found.add(i)
        lo = max([lo, *(i + 1 for i in probes if i in found and i < hi)])
    return lo
