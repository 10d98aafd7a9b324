"""What the scheduler side tells the workers each step (picklable, no vLLM types)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """Load tokens ``[start, len(tokens))`` of a request into its blocks.

    ``tokens`` is the stored prefix from token 0 (the key chain needs all of it);
    ``start`` is where the local prefix cache ends, so only groups from
    ``start // split_factor`` on are fetched; ``block_ids`` are the request's blocks
    from token 0 on; ``sizes`` holds, per rank, the object sizes of those groups (the
    lookup's probe, so the workers fetch without probing again).
    """

    req_id: str
    tokens: list[int]
    start: int
    block_ids: list[int]
    salt: str | None
    sizes: list[list[int]]


@dataclass
class SaveSpec:
    """Store groups ``[first_group, len(tokens) // split_factor)`` of a request.

    ``block_ids`` hold those groups' tokens, from group ``first_group`` on. ``repair``
    saves replace groups whose load failed; they are taken even over a full backlog.
    """

    req_id: str
    tokens: list[int]
    first_group: int
    block_ids: list[int]
    salt: str | None
    repair: bool = False


@dataclass
class Plan:
    """One step's work for every worker."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    """Requests vLLM preempted this step: their blocks are freed at once, so the copies of
    their groups must end before the step writes into the cache."""
