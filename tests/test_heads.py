"""Format 2: one object per KV head, so writers and readers of any tensor-parallel size share them."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import VUA, AsyncVUA, HeadRange, VUAConfig, open_store
from vua_s3 import fragment as fragment_format
from vua_s3.keys import fragment_key, group_digests, parse_key, token_ids
from vua_s3.shards import rank_heads, rank_writes
from vua_s3.storage import Store

CFG = VUAConfig(split_factor=16, namespace="heads")
TOKENS = torch.randint(0, 50_000, (64,), generator=torch.Generator().manual_seed(3))
KV_HEADS = 4


def heads_of(kv: list[tuple[torch.Tensor, torch.Tensor]], heads: HeadRange) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[:, heads.start : heads.stop], v[:, heads.start : heads.stop]) for k, v in kv]


class Counting:
    """Counts the probe requests a store is asked for (one per set of keys), the keys
    they probe and the keys read."""

    def __init__(self, store: Store) -> None:
        self.probes = 0
        self.heads: list[str] = []
        self.gets: list[str] = []
        head_siblings, get_into = store.head_siblings, store.get_into

        async def counted_head_siblings(sets):  # type: ignore[no-untyped-def]
            self.probes += len(sets)
            self.heads += [key for keys in sets for key in keys]
            return await head_siblings(sets)

        async def counted_get_into(key, out):  # type: ignore[no-untyped-def]
            self.gets.append(key)
            return await get_into(key, out)

        store.head_siblings = counted_head_siblings  # type: ignore[method-assign]
        store.get_into = counted_get_into  # type: ignore[method-assign]


@pytest.mark.parametrize(("writer", "reader"), [(1, 2), (2, 1), (4, 2), (2, 4), (8, 1), (1, 8)])
def test_writers_and_readers_of_any_tp_size_share_objects(location: str, writer: int, reader: int) -> None:
    """Ranks of a TP=writer engine store only what they hold (replicated heads once); every
    rank of a TP=reader engine, and an all-heads reader, get exactly their heads."""
    kv = random_kvcache(layers=2, seq_len=64, heads=KV_HEADS, head_dim=8)
    with VUA(CFG, location) as vua:
        for rank in range(writer):
            heads = rank_writes(writer, rank, KV_HEADS)
            if heads is not None:
                assert vua.put(TOKENS, heads_of(kv, heads), heads=heads) == 4
    with VUA(CFG, location) as fresh:
        counting = Counting(fresh.store)
        for rank in range(reader):
            heads = rank_heads(reader, rank, KV_HEADS)
            assert fresh.lookup(TOKENS, heads=heads) == 64
            hit = fresh.get_closest(TOKENS, heads=heads)
            assert hit is not None and torch.equal(hit.tokens, TOKENS)
            assert_kv_equal(hit.data, heads_of(kv, heads))
        # one probe request per group per lookup, asking for every head of the rank
        # (get_closest reuses what the lookup found), and exactly the objects of its heads
        assert counting.probes == reader * 4
        assert len(counting.heads) == len(counting.gets) == 4 * reader * max(1, KV_HEADS // reader)
        everything = fresh.get_closest(TOKENS)
        assert everything is not None
        assert_kv_equal(everything.data, kv)
    listing = asyncio.run(_keys(location))
    assert len(listing) == 4 * KV_HEADS  # every head stored once, whatever the writers' TP size


async def _keys(location: str) -> list[str]:
    store = open_store(location)
    try:
        return [info.key async for info in store.list()]
    finally:
        await store.close()


def test_an_all_heads_reader_learns_the_head_count_once(location: str) -> None:
    kv = random_kvcache(layers=2, seq_len=64, heads=KV_HEADS, head_dim=8)
    with VUA(CFG, location) as writer:
        writer.put(TOKENS, kv)
    with VUA(CFG, location) as reader:
        for _ in range(2):  # first: head 0 of each group, then the rest; then all at once
            hit = reader.get_closest(TOKENS)
            assert hit is not None
            assert_kv_equal(hit.data, kv)


def test_a_missing_head_of_another_writer_ends_the_prefix(location: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """Rank 1's head 3 of group 2 is missing: a lookup that asks for it, or for every head
    once the object knows how many, ends the prefix there, and so does the load."""
    kv = random_kvcache(layers=2, seq_len=64, heads=KV_HEADS, head_dim=8)
    with VUA(CFG, location) as vua:
        for rank in range(2):
            heads = rank_writes(2, rank, KV_HEADS)
            assert heads is not None
            vua.put(TOKENS, heads_of(kv, heads), heads=heads)
        digest = group_digests(token_ids(TOKENS, 16), 16, CFG.namespace, None)[2]
        asyncio.run(vua.store.delete(fragment_key(CFG.namespace, digest, 3)))
    with VUA(CFG, location) as reader:
        assert reader.lookup(TOKENS) == 64  # the head count unknown yet: head 0 only, may overstate
        assert reader.lookup(TOKENS, heads=rank_heads(2, 1, KV_HEADS)) == 32  # heads 2 and 3 checked
        assert reader.lookup(TOKENS, heads=rank_heads(2, 0, KV_HEADS)) == 64
        with caplog.at_level(logging.INFO, logger="vua_s3"):
            hit = reader.get_closest(TOKENS)
        assert hit is not None and hit.tokens.numel() == 32
        assert reader.lookup(TOKENS) == 32  # the load told it 4 heads: all are checked now
        assert_kv_equal(hit.data, [(k[:, :, :32], v[:, :, :32]) for k, v in kv])
        rank0 = reader.get_closest(TOKENS, heads=rank_heads(2, 0, KV_HEADS))
        assert rank0 is not None and rank0.tokens.numel() == 64  # rank 0's heads are all there


def test_an_object_under_another_heads_key_is_refused(location: str, caplog) -> None:  # type: ignore[no-untyped-def]
    kv = random_kvcache(layers=2, seq_len=64, heads=KV_HEADS, head_dim=8)
    digest = group_digests(token_ids(TOKENS, 16), 16, CFG.namespace, None)[1]
    with VUA(CFG, location) as vua:
        vua.put(TOKENS, kv)

        async def swap() -> None:
            await vua.store.put(
                fragment_key(CFG.namespace, digest, 2), await vua.store.get(fragment_key(CFG.namespace, digest, 1))
            )

        asyncio.run(swap())
    with VUA(CFG, location) as reader, caplog.at_level(logging.WARNING, logger="vua_s3"):
        hit = reader.get_closest(TOKENS)
    assert hit is not None and hit.tokens.numel() == 16
    assert "object holds KV head 1, expected head 2" in caplog.text


def test_format_1_objects_are_never_read(location: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """A format-1 object (every head in one, key without .h<head>) is a miss; the tools see it."""
    from safetensors.torch import save

    ids = token_ids(TOKENS, 16)
    digest = group_digests(ids, 16, CFG.namespace, None)[0]
    kv = torch.zeros(2, 2, KV_HEADS, 16, 8, dtype=torch.float16)
    meta = fragment_format.group_metadata(CFG.namespace, 16, 0, digest, None)
    v1 = save({"tokens": ids[:16], "kv": kv}, metadata={**meta, "format": "vua_s3/fragment", "version": "1"})
    v1_key = f"{CFG.namespace}/{digest.hex()[:2]}/{digest.hex()}.safetensors"
    with VUA(CFG, location) as vua:
        asyncio.run(vua.store.put(v1_key, v1))
        assert vua.lookup(TOKENS) == 0 and vua.get_closest(TOKENS) is None
        info = parse_key(v1_key)
        assert info is not None and info.version == 1 and info.head is None
        # even under a format-2 key it is refused, with the reason
        asyncio.run(vua.store.put(fragment_key(CFG.namespace, digest, 0), v1))
        with caplog.at_level(logging.WARNING, logger="vua_s3"):
            assert vua.get_closest(TOKENS) is None
    assert "not a version 2 fragment" in caplog.text


def test_put_groups_and_load_group_for_a_rank(location: str) -> None:
    """What the vLLM connector calls: a rank writes the tail groups of its heads, then
    loads one group of its heads into its own buffer with one GET per head, no HEAD."""
    kv = random_kvcache(layers=2, seq_len=64, heads=KV_HEADS, head_dim=8)
    heads = rank_heads(2, 1, KV_HEADS)
    tail = [(k[:, heads.start : heads.stop, 16:], v[:, heads.start : heads.stop, 16:]) for k, v in kv]

    async def go() -> None:
        async with AsyncVUA(CFG, location) as writer:
            await writer.put_groups(token_ids(TOKENS, 16), tail, range(1, 4), kv_start=16, heads=heads)
        async with AsyncVUA(CFG, location) as reader:
            counting = Counting(reader.store)
            out = torch.empty(2, 2, heads.count, 16, 8, dtype=torch.float16)
            assert await reader.load_group(TOKENS, 2, heads, out)
            for layer in range(2):
                assert torch.equal(out[layer, 0], kv[layer][0][0, heads.start : heads.stop, 32:48])
                assert torch.equal(out[layer, 1], kv[layer][1][0, heads.start : heads.stop, 32:48])
            assert (len(counting.heads), len(counting.gets)) == (0, heads.count)
            assert not await reader.load_group(TOKENS, 0, heads, out)  # group 0 was never written
            assert not await reader.load_group(TOKENS, 1, rank_heads(2, 0, KV_HEADS), out)  # nor rank 0's heads
            with pytest.raises(ValueError, match=r"out must be \[layers, 2, 2, 16, head_dim\]"):
                await reader.load_group(TOKENS, 1, heads, torch.empty(2, 2, 4, 16, 8))
            with pytest.raises(ValueError, match="kvcache holds 2 KV heads but heads="):
                await reader.put_groups(token_ids(TOKENS, 16), tail, [1], kv_start=16, heads=HeadRange.all(4))

    asyncio.run(go())


def test_objects_of_a_group_have_one_size(location: str) -> None:
    """The head index is zero-padded, so one probe's size serves every head of a group."""
    kv = random_kvcache(layers=1, seq_len=16, heads=12, head_dim=4)
    with VUA(CFG, location) as vua:
        vua.put(TOKENS[:16], kv)
        sizes = {
            info.size
            for info in asyncio.run(vua.store.head_many(CFG.tokens_to_paths(TOKENS[:16], kv_heads=12)))
            if info
        }
    assert len(sizes) == 1


def test_tools_show_and_expire_format_1_objects(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from vua_s3.cli.main import main

    with VUA(CFG, tmp_path) as vua:
        vua.put(TOKENS, random_kvcache(layers=1, seq_len=64, heads=2, head_dim=4))
        v1_key = f"{CFG.namespace}/ab/{'ab' * 32}.safetensors"
        asyncio.run(vua.store.put(v1_key, b"a format 1 object"))
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("heads "))
    assert row[1:4] == ["9", "4", "1"]  # objects, groups, format-1 objects
    assert "1 objects of format 1 are never read; gc expires them by age" in out
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "heads/\t9 objects\t4 groups" in out and "1 of format 1 (never read)" in out
    assert main(["ls", str(tmp_path), "heads"]) == 0
    kinds = sorted(line.split()[3] for line in capsys.readouterr().out.splitlines())
    assert kinds == ["h0"] * 4 + ["h1"] * 4 + ["v1"]
    assert main(["gc", str(tmp_path), "--older-than", "0s"]) == 0
    assert "deleted 9 of 9 objects" in capsys.readouterr().out
