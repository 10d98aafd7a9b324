"""POSIX stores never follow symbolic links planted inside their root.

Whoever can write into the directory could otherwise make a reader take a file from
elsewhere, or make a writer or ``gc`` write or delete outside the root. Each case plants
a link to a valid copy outside the root: following it would look like success.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_kv_equal, random_kvcache

from vua_s3 import VUA, StoreError, VUAConfig
from vua_s3.ops.gc import gc
from vua_s3.storage.posix import PosixStore

CFG = VUAConfig(split_factor=16)
TOKENS = torch.arange(48) * 13 + 1
KV = random_kvcache(seq_len=48, heads=1)  # one object per group
KEYS = CFG.tokens_to_paths(TOKENS)


def _keys(store: PosixStore) -> list[str]:
    async def walk() -> list[str]:
        return sorted([info.key async for info in store.list()])

    return asyncio.run(walk())


def test_linked_fragment_is_not_an_object(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    with VUA(CFG, root) as vua:
        vua.put(TOKENS, KV)
        outside.mkdir()
        target = outside / "copy.safetensors"
        shutil.copy(root / KEYS[1], target)
        (root / KEYS[1]).unlink()
        (root / KEYS[1]).symlink_to(target)
        assert vua.lookup(TOKENS) == 16
        res = vua.get_closest(TOKENS)
        assert res is not None and res.tokens.numel() == 16
        assert_kv_equal(res.data, [(k[:, :, :16], v[:, :, :16]) for k, v in KV])
        assert KEYS[1] not in _keys(PosixStore(root))
        vua.put(TOKENS, KV)  # the writer replaces the link with a real file
        assert not (root / KEYS[1]).is_symlink() and target.exists()
        assert vua.lookup(TOKENS) == 48


def test_linked_directory_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    with VUA(CFG, root) as vua:
        vua.put(TOKENS, KV)
        fanout = (root / KEYS[1]).parent
        shutil.copytree(fanout, outside)
        shutil.rmtree(fanout)
        fanout.symlink_to(outside, target_is_directory=True)
        assert vua.lookup(TOKENS) == 16
        res = vua.get_closest(TOKENS)
        assert res is not None and res.tokens.numel() == 16
        with pytest.raises(StoreError, match="symbolic link"):
            vua.put(TOKENS, KV)
        asyncio.run(vua.store.delete(KEYS[1]))
    report = asyncio.run(gc(str(root), older_than=0.0))
    assert report.deleted == 2  # groups 0 and 2; nothing behind the link
    assert (outside / Path(KEYS[1]).name).exists()
    assert [p.name for p in outside.iterdir()] == [Path(KEYS[1]).name]


def test_linked_namespace_directory_gets_no_writes(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / CFG.namespace).symlink_to(outside, target_is_directory=True)
    with VUA(CFG, root) as vua:
        with pytest.raises(StoreError, match=rf"writing .*{CFG.namespace}.*symbolic link"):
            vua.put(TOKENS, KV)
        assert vua.get_closest(TOKENS) is None
    assert list(outside.iterdir()) == []
