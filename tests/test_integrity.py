"""Damaged or foreign objects are misses at the right place, never returned, never raised."""

from __future__ import annotations

import asyncio
import logging
import zlib

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import VUA, VUAConfig
from vua_s3 import fragment as fragment_format
from vua_s3.keys import group_digests, token_ids

CFG = VUAConfig(split_factor=16)
TOKENS = torch.randint(0, 50_000, (64,), generator=torch.Generator().manual_seed(7))


def stored(location: str) -> tuple[VUA, list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    vua = VUA(CFG, location)
    kv = random_kvcache(seq_len=64)
    vua.put(TOKENS, kv)
    return vua, kv, CFG.tokens_to_paths(TOKENS)


def rewrite(vua: VUA, key: str, change) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        data = await vua.store.get(key)
        await vua.store.put(key, change(bytearray(data)))

    asyncio.run(go())


def expect_prefix(vua: VUA, kv: list[tuple[torch.Tensor, torch.Tensor]], groups: int) -> None:
    res = vua.get_closest(TOKENS)
    if groups == 0:
        assert res is None
        return
    assert res is not None
    assert torch.equal(res.tokens, TOKENS[: groups * 16])
    assert_kv_equal(res.data, [(k[:, :, : groups * 16], v[:, :, : groups * 16]) for k, v in kv])


def flip_last_byte(buf: bytearray) -> bytearray:
    buf[-1] ^= 0x40
    return buf


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (flip_last_byte, "checksum mismatch"),
        (lambda buf: buf[: len(buf) - 100], "data section"),
        (lambda buf: buf[:5], "too short"),
        (lambda buf: bytearray(b"\xff" * 8) + buf[8:], "header claims"),
        (lambda buf: bytearray(b"not a safetensors file at all"), "header"),
    ],
    ids=["flipped-byte", "truncated-data", "truncated-header", "bad-length", "garbage"],
)
def test_damaged_fragment_ends_the_prefix(location: str, damage, reason: str, caplog) -> None:  # type: ignore[no-untyped-def]
    vua, kv, keys = stored(location)
    rewrite(vua, keys[2], damage)
    with caplog.at_level(logging.WARNING, logger="vua_s3"):
        expect_prefix(vua, kv, groups=2)
    assert any(keys[2] in r.message and reason in r.message for r in caplog.records), caplog.text
    vua.close()


def test_damaged_first_fragment_is_a_full_miss(location: str) -> None:
    vua, kv, keys = stored(location)
    rewrite(vua, keys[0], flip_last_byte)
    expect_prefix(vua, kv, groups=0)
    assert vua.lookup(TOKENS) == 64  # lookup probes only; get_closest checks contents
    vua.close()


def test_token_mismatch_is_a_miss(location: str) -> None:
    """A well-formed fragment with the right name and metadata but other tokens."""
    vua, kv, keys = stored(location)
    ids = token_ids(TOKENS, 16)
    digests = group_digests(ids, 16, CFG.namespace, None)
    wrong_tokens = ids[16:32].clone()
    wrong_tokens[3] += 1
    forged = bytearray().join(
        fragment_format.Encoder(kv, 0).encode(
            16,
            wrong_tokens,
            {
                "namespace": CFG.namespace,
                "split_factor": "16",
                "group": "1",
                "digest": digests[1].hex(),
                "parent": digests[0].hex(),
            },
            head=0,
            kv_heads=2,
        )
    )
    rewrite(vua, keys[1], lambda _: forged)
    expect_prefix(vua, kv, groups=1)
    vua.close()


def test_fragment_of_another_group_is_a_miss(location: str) -> None:
    vua, kv, keys = stored(location)

    async def copy() -> None:
        await vua.store.put(keys[3], await vua.store.get(keys[1]))

    asyncio.run(copy())
    expect_prefix(vua, kv, groups=3)
    vua.close()


def test_gap_in_the_chain_ends_the_prefix(location: str) -> None:
    vua, kv, keys = stored(location)
    asyncio.run(vua.store.delete(keys[1]))
    expect_prefix(vua, kv, groups=1)
    assert vua.lookup(TOKENS) == 16
    vua.put(TOKENS, kv)  # put fills the gap back in
    expect_prefix(vua, kv, groups=4)
    vua.close()


def test_fragment_from_another_namespace_is_never_returned(location: str) -> None:
    """Even copied under this namespace's key, the metadata gives it away."""
    other = VUAConfig(split_factor=16, namespace="other-model")
    with VUA(other, location) as foreign:
        foreign.put(TOKENS, random_kvcache(seq_len=64))
        foreign_keys = other.tokens_to_paths(TOKENS)

        async def transplant() -> None:
            for src, dst in zip(foreign_keys, CFG.tokens_to_paths(TOKENS), strict=True):
                await foreign.store.put(dst, await foreign.store.get(src))

        asyncio.run(transplant())
    with VUA(CFG, location) as vua:
        assert vua.lookup(TOKENS) == 64
        assert vua.get_closest(TOKENS) is None


def test_fragments_are_readable_by_safetensors(location: str) -> None:
    from safetensors.torch import load

    vua, kv, keys = stored(location)
    data = asyncio.run(vua.store.get(keys[1]))
    tensors = load(bytes(data))
    assert torch.equal(tensors["tokens"], TOKENS[16:32])
    assert tensors["kv"].shape == (2, 2, 1, 16, 8)  # layers, K/V, one KV head (head 0), tokens, head_dim
    assert torch.equal(tensors["kv"][1, 0], kv[1][0][0, :1, 16:32])
    assert torch.equal(tensors["kv"][0, 1], kv[0][1][0, :1, 16:32])
    vua.close()


def test_objects_carry_crc32c_and_zlib_crc32_objects_stay_readable(location: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """New objects are checksummed with CRC-32C; objects written with zlib's CRC-32 (before
    CRC-32C, or where awscrt is missing) are still read and still checked."""
    vua, kv, keys = stored(location)
    assert "crc32c" in vua_metadata(vua, keys[0])
    vua.close()

    legacy = VUA(VUAConfig(split_factor=16, namespace="legacy"), location)
    with monkeypatch.context() as patch:
        patch.setattr(fragment_format, "_CRC", zlib.crc32)
        patch.setattr(fragment_format, "_CRC_KEY", "crc32")
        legacy.put(TOKENS, kv)
    legacy_keys = VUAConfig(split_factor=16, namespace="legacy").tokens_to_paths(TOKENS)
    meta = vua_metadata(legacy, legacy_keys[0])
    assert "crc32" in meta and "crc32c" not in meta
    expect_prefix(legacy, kv, groups=4)
    rewrite(legacy, legacy_keys[1], flip_last_byte)
    reader = VUA(VUAConfig(split_factor=16, namespace="legacy"), location)
    expect_prefix(reader, kv, groups=1)
    legacy.close()
    reader.close()


def vua_metadata(vua: VUA, key: str) -> dict[str, str]:
    async def go() -> bytes:
        return bytes(await vua.store.get(key))

    return fragment_format.decode(bytearray(asyncio.run(go()))).metadata
