"""What is stored: the objects one cache object has recently seen, and the probes that
ask the store (one request per group, in a few waves; ``probe.py`` plans the waves)."""

from __future__ import annotations

from collections.abc import Sequence

from .keys import Group
from .probe import stored_prefix
from .recent import Recent
from .storage import ObjectInfo, Store


class KnownPresent:
    """Keys this object just stored or found, with their sizes: lets a probe skip a request.

    Bounded (least recently used go first) and short-lived: an object can vanish by
    lifecycle expiry or a ``gc`` elsewhere, so a hit is trusted for ``ttl`` seconds at
    most. A stale hit costs little: ``get_closest`` treats a vanished fragment as the
    end of the prefix and forgets it. Keys seen missing are kept too, for ``put`` only:
    it uploads them again even where the chain says they are stored (a hole); a stale
    one costs one needless upload. Probes never take a miss from here.
    """

    def __init__(self, capacity: int = 4096, ttl: float = 30.0) -> None:
        self._entries: Recent[str, ObjectInfo | None] = Recent(capacity, ttl)

    def get(self, key: str) -> ObjectInfo | None:
        entry = self._entries.entry(key, touch=True)
        return None if entry is None else entry[0]

    def seen_missing(self, key: str) -> bool:
        entry = self._entries.entry(key, touch=True)
        return entry is not None and entry[0] is None

    def add(self, info: ObjectInfo) -> None:
        self._entries.put(info.key, info)

    def add_missing(self, key: str) -> None:
        self._entries.put(key, None)

    def discard(self, key: str) -> None:
        self._entries.discard(key)

    def clear(self) -> None:
        self._entries.clear()


class Prober:
    """Probes groups of a chain: a group is stored if every head object asked for is,
    and answers with its representative's info (the first of ``heads``, whose writer
    stores it after the others). What a probe finds is remembered key by key."""

    def __init__(self, store: Store, known: KnownPresent, waves: int) -> None:
        self._store = store
        self._known = known
        self._waves = waves
        self.requests = 0
        """Groups probed so far, one request each (a LIST of a group's heads on S3)."""

    def known_stored(self, group: Group, heads: Sequence[int]) -> ObjectInfo | None:
        """The representative's info if this object knows every head of ``group`` present."""
        infos = [self._known.get(key) for key in group.keys(heads)]
        return infos[0] if all(info is not None for info in infos) else None

    async def wave(
        self, groups: Sequence[Group], heads: Sequence[int], *, trust_known: bool = True
    ) -> list[ObjectInfo | None]:
        """One wave: one request per group not known to be stored (every group unless ``trust_known``)."""
        infos = [self.known_stored(group, heads) if trust_known else None for group in groups]
        unknown = [i for i, info in enumerate(infos) if info is None]
        if unknown:
            sets = [groups[i].keys(heads) for i in unknown]
            self.requests += len(sets)
            found = await self._store.head_siblings(sets)
            for i, keys, answers in zip(unknown, sets, found, strict=True):
                for key, info in zip(keys, answers, strict=True):
                    if info is None:
                        self._known.add_missing(key)
                    else:
                        self._known.add(info)
                infos[i] = answers[0] if all(info is not None for info in answers) else None
        return infos

    async def stored_prefix(self, groups: Sequence[Group], heads: Sequence[int], *, trust_known: bool) -> int:
        """How many leading ``groups`` are stored, found in at most ``waves`` waves."""

        async def wave(batch: Sequence[Group]) -> list[ObjectInfo | None]:
            return await self.wave(batch, heads, trust_known=trust_known)

        return await stored_prefix(groups, wave, self._waves)

    async def missing(self, groups: Sequence[Group], heads: Sequence[int]) -> list[int]:
        """The groups a writer must upload: those from the end of the stored prefix on, and
        any before it this object saw missing a head (a hole is filled, not trusted to the chain)."""
        missing: list[int] = []
        start = 0
        seen_missing = [any(self._known.seen_missing(key) for key in group.keys(heads)) for group in groups]
        while True:
            hole = next((i for i in range(start, len(groups)) if seen_missing[i]), len(groups))
            # A group known to be stored vouches for those before it, as the search's probes do.
            known = (i + 1 for i in range(start, hole) if self.known_stored(groups[i], heads) is not None)
            lo = max(known, default=start)
            end = lo + await self.stored_prefix(groups[lo:hole], heads, trust_known=True)
            if end < hole or hole == len(groups):
                return missing + list(range(end, len(groups)))
            missing.append(hole)
            start = hole + 1


def leading_hits(infos: Sequence[ObjectInfo | None]) -> list[ObjectInfo]:
    """The probe results up to the first miss: a gap ends the prefix."""
    hits = []
    for info in infos:
        if info is None:
            break
        hits.append(info)
    return hits
