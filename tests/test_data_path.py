"""The fast data path: bodies sent as views of tensor memory, pooled receive buffers,
and the known-present cache that lets a probe skip its HEAD."""

from __future__ import annotations

import asyncio
import io

import aioboto3
import pytest
import torch
from conftest import assert_kv_equal, random_kvcache, unique_prefix

from vua_s3 import VUA, ObjectNotFoundError, VUAConfig, open_store
from vua_s3 import fragment as fragment_format
from vua_s3.errors import SizeMismatchError
from vua_s3.storage import Store
from vua_s3.storage.posix import PosixStore
from vua_s3.storage.s3 import S3Store
from vua_s3.storage.s3.body import SegmentBody, cut
from vua_s3.testing.faultproxy import Fault, FaultProxy

CFG = VUAConfig(split_factor=16)
TOKENS = torch.randint(0, 50_000, (64,), generator=torch.Generator().manual_seed(3))


def segments_of(*chunks: bytes) -> list[memoryview]:
    return [memoryview(c) for c in chunks]


def test_segment_body_reads_seeks_and_measures_like_a_file() -> None:
    body = SegmentBody(segments_of(b"abc", b"", b"defgh", b"ij"))
    assert len(body) == 10 and body.size == 10
    assert bytes(body.read(2)) == b"ab"
    assert bytes(body.read(100)) == b"c"  # short read at a segment's end
    assert bytes(body.read()) == b"defgh"
    assert body.tell() == 8
    assert bytes(body.read()) == b"ij" and body.read() == b""
    assert body.seek(4) == 4 and bytes(body.read(3)) == b"efg"
    assert body.seek(0, io.SEEK_END) == 10 and body.read() == b""
    body.seek(0)
    assert b"".join(bytes(c) for c in iter(lambda: body.read(4), b"")) == b"abcdefghij"


@pytest.mark.parametrize(("start", "end"), [(0, 10), (0, 3), (2, 7), (3, 8), (8, 10), (5, 5)])
def test_cut_covers_exactly_the_range(start: int, end: int) -> None:
    segments = segments_of(b"abc", b"defgh", b"ij")
    assert b"".join(bytes(v) for v in cut(segments, start, end)) == b"abcdefghij"[start:end]


def test_fragment_segments_are_views_of_the_tensors_and_decode_joined() -> None:
    kv = random_kvcache(layers=2, seq_len=64, heads=3, head_dim=8, dtype=torch.bfloat16)
    meta = {"namespace": "n", "split_factor": "16", "group": "1", "digest": "d", "parent": "p"}
    # the object of KV head 4 of 6, from a cache holding heads 3, 4, 5 (a tensor-parallel rank)
    segments = fragment_format.Encoder(kv, 0, first_head=3).encode(16, TOKENS[16:32], meta, head=4, kv_heads=6)
    whole = bytearray().join(segments)
    assert len(whole) == fragment_format.encoded_size(2, 16, 8, torch.bfloat16, meta, head=4, kv_heads=6)
    # header, tokens, then one view per layer x (K, V) straight over the caller's memory
    assert len(segments) == 2 + 2 * 2
    k0 = kv[0][0]
    assert segments[2].obj is not None
    assert torch.frombuffer(segments[2], dtype=torch.bfloat16).data_ptr() == k0[0, 1, 16].data_ptr()
    frag = fragment_format.decode(whole)
    assert (frag.head, frag.kv_heads) == (4, 6)
    assert torch.equal(frag.kv[1, 1].view(torch.uint8), kv[1][1][0, 1:2, 16:32].contiguous().view(torch.uint8))


def test_any_kv_layout_round_trips(location: str) -> None:
    """Non-contiguous K/V (a transposed view) go through the staging copy, bit-exact."""
    base = random_kvcache(layers=2, seq_len=64, heads=4, head_dim=8)
    transposed = [(k.transpose(1, 2).contiguous().transpose(1, 2), v[:, :, :, :].clone()) for k, v in base]
    assert not transposed[0][0][0, :, 0:16].is_contiguous()
    with VUA(CFG, location) as vua:
        assert vua.put(TOKENS, transposed) == 4
        res = vua.get_closest(TOKENS)
    assert res is not None
    assert_kv_equal(res.data, base)


class CountingHeads:
    """Wraps a store's head_siblings to count the probe requests it is asked for: one per
    group (the group's head objects together)."""

    def __init__(self, store: Store) -> None:
        self.keys = 0
        original = store.head_siblings

        async def head_siblings(sets):  # type: ignore[no-untyped-def]
            self.keys += len(sets)
            return await original(sets)

        store.head_siblings = head_siblings  # type: ignore[method-assign]


def test_known_present_keys_skip_the_probe_and_vanished_ones_are_forgotten(location: str) -> None:
    kv = random_kvcache(seq_len=64)
    with VUA(CFG, location) as vua:
        heads = CountingHeads(vua.store)
        assert vua.put(TOKENS, kv) == 4
        assert heads.keys == 4  # the cold put probed every group once
        assert vua.put(TOKENS, kv) == 0
        res = vua.get_closest(TOKENS)
        assert res is not None and res.tokens.numel() == 64
        assert heads.keys == 4  # stored by this object moments ago: no HEAD needed
        assert vua.lookup(TOKENS) == 64
        assert heads.keys == 8  # a lookup always asks the store

        keys = CFG.tokens_to_paths(TOKENS)

        async def delete() -> None:
            other = open_store(location)
            try:
                await other.delete(keys[2])
            finally:
                await other.close()

        asyncio.run(delete())
        res = vua.get_closest(TOKENS)  # trusts the cache, finds group 2 gone: the prefix ends there
        assert res is not None and res.tokens.numel() == 32
        assert_kv_equal(res.data, [(k[:, :, :32], v[:, :, :32]) for k, v in kv])
        assert vua.put(TOKENS, kv) == 1  # group 2 was seen missing: written back without a HEAD
        assert heads.keys == 8
        assert vua.lookup(TOKENS) == 64


def test_misses_are_never_cached(location: str) -> None:
    kv = random_kvcache(seq_len=64)
    with VUA(CFG, location) as reader, VUA(CFG, location) as writer:
        assert reader.lookup(TOKENS) == 0
        writer.put(TOKENS, kv)
        assert reader.lookup(TOKENS) == 64


def test_receive_buffers_are_reused_across_reads(moto_server) -> None:  # type: ignore[no-untyped-def]
    kv = random_kvcache(layers=4, seq_len=64, heads=4, head_dim=64)
    with VUA(CFG, moto_server.url(unique_prefix()), max_inflight=2) as vua:
        vua.put(TOKENS, kv)
        first = vua.get_closest(TOKENS)
        allocated, idle = vua.core.buffers.allocated, vua.core.buffers.idle()
        assert 0 < idle == allocated <= 2  # one buffer per object in transit, at most max_inflight
        second = vua.get_closest(TOKENS)
        assert (vua.core.buffers.allocated, vua.core.buffers.idle()) == (allocated, idle)  # every buffer reused
    assert first is not None and second is not None
    assert_kv_equal(second.data, kv)
    assert_kv_equal(first.data, kv)  # results own their memory: reusing the buffers left them intact


def test_heads_go_direct_and_fall_back_to_botocore(moto_server) -> None:  # type: ignore[no-untyped-def]
    """HEADs (probes of one head) skip botocore's pipeline; when the direct path fails,
    botocore answers instead, and keeps answering (the direct path is turned off)."""
    kv = random_kvcache(seq_len=32, heads=1)
    botocore_heads = []
    session = aioboto3.Session()
    session.events.register("before-call.s3.HeadObject", lambda **_: botocore_heads.append(1))
    with FaultProxy(moto_server.port) as proxy:
        url = moto_server.url(unique_prefix()).replace(moto_server.endpoint_url, proxy.endpoint_url)
        store = S3Store.from_url(url, session=session)
        with VUA(CFG, store) as vua:
            vua.put(TOKENS[:32], kv)
            vua.forget_known()
            assert vua.lookup(TOKENS) == 32
            assert botocore_heads == [] and store.requests["head_object"] == 6
            # Every HEAD not sent by botocore (it marks its own) has its connection reset.
            proxy.faults.append(Fault("reset", method="HEAD", without_header="amz-sdk-invocation-id"))
            vua.forget_known()
            assert vua.lookup(TOKENS) == 32  # same answer, from botocore
            assert len(botocore_heads) >= 1
            before, resets = len(botocore_heads), proxy.served("reset")
            vua.forget_known()
            assert vua.lookup(TOKENS) == 32
            assert len(botocore_heads) > before
            assert proxy.served("reset") == resets  # the direct path was turned off after its failures


def test_put_stores_the_leading_positions_of_a_longer_kvcache(location: str) -> None:
    """As the original VUA: tokens trimmed to the split factor, the KV of the whole prompt."""
    kv = random_kvcache(seq_len=80)
    with VUA(CFG, location) as vua:
        assert vua.put(TOKENS, kv) == 4
        res = vua.get_closest(TOKENS)
        with pytest.raises(ValueError, match="seq_len 48 but tokens have 64"):
            vua.put(TOKENS, [(k[:, :, :48], v[:, :, :48]) for k, v in kv])
    assert res is not None and res.tokens.numel() == 64
    assert_kv_equal(res.data, [(k[:, :, :64], v[:, :, :64]) for k, v in kv])


def test_posix_reads_into_the_callers_buffer_and_writes_segments_unjoined(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``put_segments`` writes many views with ``writev`` (more than IOV_MAX of them here);
    ``get_into`` fills the caller's buffer and refuses an object of another size."""
    store = PosixStore(tmp_path)
    chunks = [bytes([i % 251]) * (i % 7) for i in range(3000)]

    async def scenario() -> None:
        await store.put_segments("a/b", [memoryview(c) for c in chunks])
        whole = b"".join(chunks)
        out = bytearray(len(whole))
        await store.get_into("a/b", memoryview(out))
        assert out == whole
        for size in (len(whole) - 1, len(whole) + 1):
            with pytest.raises(SizeMismatchError):
                await store.get_into("a/b", memoryview(bytearray(size)))
        with pytest.raises(ObjectNotFoundError):
            await store.get_into("a/none", memoryview(bytearray(1)))
        assert await store.get("a/b") == whole
        assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp-")]

    asyncio.run(scenario())
