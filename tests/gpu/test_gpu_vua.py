"""``VUA.put`` from device tensors and ``get_closest(device=...)`` back, bit-exact, on POSIX and S3.

On CUDA the data is Llama-3-8B's KV shape for 8k tokens; on the CPU a slice of it. The result
must be usable the moment ``get_closest`` returns: it is compared at once on another stream
(which waits for nothing vua_s3 did not wait for), and again after a device synchronize.
"""

from __future__ import annotations

import contextlib
import inspect
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gpu_cases import CUDA, DEVICES, NO_CUDA, SIZES, on, posix_dir, same_bits, synchronize

from vua_s3 import VUA, VUAConfig

pytestmark = pytest.mark.gpu

PINNED_KEYWORD = "pinned" in inspect.signature(VUA.get_closest).parameters
NO_PINNED_KEYWORD = "VUA.get_closest takes no 'pinned' keyword yet; these cases run once it does"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Stored:
    """One prompt's KV put from ``device`` into ``location``."""

    device: str
    location: str
    cfg: VUAConfig
    tokens: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    written: int


CASES = [on(d, s, t, id=f"{s}-{t}") for d in ("cpu", "cuda") for s in ("posix", "s3") for t in DTYPES]


@pytest.fixture(scope="module", params=CASES)
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """The put, once per device, store and dtype for all the tests of this module."""
    device, store, dtype_name = request.param
    size = SIZES[device]
    if store == "posix":
        location = posix_dir(tmp_path_factory)
    else:
        location = request.getfixturevalue("moto_server").url(f"gpu-{uuid.uuid4().hex[:12]}")
    generator = torch.Generator(device).manual_seed(11)
    shape = (1, size.kv_heads, size.tokens, size.head_dim)
    kv = [
        (
            torch.randn(shape, generator=generator, device=device).to(DTYPES[dtype_name]),
            torch.randn(shape, generator=generator, device=device).to(DTYPES[dtype_name]),
        )
        for _ in range(size.layers)
    ]
    tokens = torch.randint(0, 128_000, (size.tokens,), generator=torch.Generator().manual_seed(12))
    cfg = VUAConfig(split_factor=size.split_factor, namespace=f"gpu-{dtype_name}")
    with VUA(cfg, location) as vua:
        written = vua.put(tokens, kv)
    yield Stored(device, location, cfg, tokens, kv, written)
    if store == "posix":
        shutil.rmtree(location, ignore_errors=True)


def test_put_from_the_device_writes_every_group_once(stored: Stored) -> None:
    assert stored.kv[0][0].device.type == stored.device
    assert stored.written == stored.tokens.numel() // stored.cfg.split_factor
    with VUA(stored.cfg, stored.location) as vua:
        assert vua.put(stored.tokens, stored.kv) == 0
        assert vua.lookup(stored.tokens) == stored.tokens.numel()


@pytest.mark.parametrize("pinned", [None, True, False], ids=["pinned-default", "pinned-true", "pinned-false"])
def test_get_closest_onto_the_device_is_bit_exact_at_once(stored: Stored, pinned: bool | None) -> None:
    if pinned is not None and not PINNED_KEYWORD:
        pytest.skip(NO_PINNED_KEYWORD)
    if pinned and not CUDA:
        pytest.skip(NO_CUDA + " (page-locked memory needs one)")
    options = {} if pinned is None else {"pinned": pinned}
    with VUA(stored.cfg, stored.location) as vua:
        hit = vua.get_closest(stored.tokens, device=stored.device, **options)
        assert hit is not None
        # At once, on a stream of its own: no synchronize, nothing ordered after vua_s3's copies.
        with torch.cuda.stream(torch.cuda.Stream()) if stored.device == "cuda" else contextlib.nullcontext():
            at_once = _compare(hit.data, stored.kv)
        synchronize(stored.device)
        after_sync = _compare(hit.data, stored.kv)
    assert hit.tokens.device.type == stored.device
    assert torch.equal(hit.tokens.cpu(), stored.tokens)
    assert len(hit.data) == len(stored.kv)
    assert {t.device.type for layer in hit.data for t in layer} == {stored.device}
    if pinned and stored.device == "cpu":
        assert all(t.is_pinned() for layer in hit.data for t in layer)
    assert at_once == [True] * 2 * len(stored.kv)
    assert after_sync == [True] * 2 * len(stored.kv)


def _compare(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """Per layer, K then V: bit-exact or not."""
    return [
        same_bits(g, w) for got_kv, want_kv in zip(got, want, strict=True) for g, w in zip(got_kv, want_kv, strict=True)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_a_prefix_cut_short_by_an_unusable_object_is_bit_exact_at_once(
    device: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A damaged object in the last group ends the prefix before it: the result is cut to the
    groups before (a copy of the output, on the device), and must be complete at once too."""
    size, groups = SIZES[device], 4
    root = posix_dir(tmp_path_factory)
    cfg = VUAConfig(split_factor=size.split_factor, namespace="gpu-cut")
    n = groups * size.split_factor
    generator = torch.Generator(device).manual_seed(13)
    shape = (1, size.kv_heads, n, size.head_dim)
    key, value = (torch.randn(shape, generator=generator, device=device).to(torch.bfloat16) for _ in range(2))
    kv = [(key, value)] * size.layers  # every layer alike: the cut, not the content, is under test
    tokens = torch.randint(0, 128_000, (n,), generator=torch.Generator().manual_seed(14))
    try:
        with VUA(cfg, root) as vua:
            vua.put(tokens, kv)
        damaged = Path(root) / cfg.tokens_to_paths(tokens, kv_heads=size.kv_heads)[-1]  # last group, last head
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
        kept = (groups - 1) * size.split_factor
        with VUA(cfg, root) as vua:
            hit = vua.get_closest(tokens, device=device)
            assert hit is not None and hit.tokens.numel() == kept
            want = [(k[:, :, :kept], v[:, :, :kept]) for k, v in kv]
            with torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext():
                at_once = _compare(hit.data, want)
        assert at_once == [True] * 2 * size.layers
    finally:
        shutil.rmtree(root, ignore_errors=True)
