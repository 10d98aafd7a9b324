"""What the scheduler side tells the workers each step (picklable, no vLLM types).

Specs name their groups by digests the scheduler chained once per request
(:class:`~vua_s3.keys.Span`, one per pipeline stage, whose namespaces differ) and carry
only those groups' tokens, so a chunk's message stays as small as the chunk's groups
however long the prompt before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...keys import Span


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of a request into its blocks.

    ``start`` is where the local prefix cache ends, so only groups from
    ``start // split_factor`` on are fetched: ``spans[stage]`` names them and ``tokens``
    are their tokens (from that group's first token); ``held[stage]`` are the digests of
    the groups before (held locally, counted as used). ``block_ids`` are the request's
    blocks from token 0 on; ``sizes`` holds, per stage, the object sizes of the fetched
    groups (the lookup's probe, so the workers fetch without probing again).
    """

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    spans: list[Span]
    held: list[tuple[bytes, ...]]
    sizes: list[list[int]]


@dataclass
class SaveSpec:
    """Store the groups of ``spans[stage]`` (per stage, the same group numbers) of a request.

    ``tokens`` are those groups' tokens and ``block_ids`` their blocks. ``repair`` saves
    replace groups whose load failed; they are taken even over a full backlog.
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    spans: list[Span]
    repair: bool = False

    @property
    def first_group(self) -> int:
        return self.spans[0].first

    @property
    def groups(self) -> range:
        return range(self.spans[0].first, self.spans[0].stop)


@dataclass
class Plan:
    """One step's work for every worker."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    """Requests vLLM preempted this step: their blocks are freed at once, so the copies of
    their groups must end before the step writes into the cache."""
