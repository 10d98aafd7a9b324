"""The vLLM connector's worker-side copies on paged caches laid out as vLLM's attention backends lay them.

vLLM 0.32 allocates every layer's cache in one buffer whose physical order is the resolved KV
cache layout, a permutation of [layers, blocks, heads, tokens, content], and hands connectors
(``register_kv_caches``) each layer as a logical ``[blocks, heads, block_size, 2 * head_size]``
view, K then V in the last dimension: FlashAttention and FlashInfer on Hopper use LBNHC
(physically [layers, blocks, tokens, heads, content]), FlashInfer on Blackwell LBHNC, and the
BL* layouts interleave layers block by block. With kernel blocks smaller than the scheduler's,
each scheduler block is ``ratio`` kernel blocks in a row. These tests build such views, save a
request's groups out of them through the worker (capture on the side stream on CUDA) and load
them back into fresh ones, bit-exact against the reference and so against the CPU path; on
CUDA the capture must wait for the compute stream's last write, ignore another stream writing
other blocks, and be complete when ``flush`` (a preemption's wait for the request's copies) returns.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gpu_cases import DEVICES, same_bits

from vua_s3 import VUA, AsyncVUA, VUAConfig
from vua_s3.integrations.vllm.paged import PagedLayer
from vua_s3.integrations.vllm.plan import LoadSpec, Plan, SaveSpec
from vua_s3.integrations.vllm.problems import Problems
from vua_s3.integrations.vllm.stats import Recorder
from vua_s3.integrations.vllm.worker import WorkerSide
from vua_s3.keys import Span
from vua_s3.loop import BackgroundLoop
from vua_s3.shards import HeadRange

pytestmark = pytest.mark.gpu

LAYERS, KV_HEADS, HEAD_SIZE, SPLIT, BLOCK = 2, 4, 64, 64, 32
GROUPS = 2
TOKENS = list(range(100, 100 + GROUPS * SPLIT))
REQUEST_BLOCKS = [5, 0, 3, 6]  # the scheduler's blocks of the request, in token order; the others stay
NUM_BLOCKS = 8
CFG = VUAConfig(split_factor=SPLIT, namespace="gpu-paged")

#: Physical order of each layout's axes, as indices into [layers, blocks, heads, tokens, content].
LAYOUTS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BLHNC": (1, 0, 2, 3, 4)}
#: (backend, layout, kernel blocks per scheduler block); the BL* layouts are never split (vLLM refuses).
CACHES = [
    pytest.param("FLASH_ATTN", "LBNHC", 1, id="flash_attn-LBNHC"),
    pytest.param("FLASH_ATTN", "LBNHC", 2, id="flash_attn-LBNHC-kernel-blocks"),
    pytest.param("FLASHINFER", "LBHNC", 1, id="flashinfer-LBHNC"),
    pytest.param("FLASHINFER", "LBHNC", 2, id="flashinfer-LBHNC-kernel-blocks"),
    pytest.param("FLASH_ATTN", "BLNHC", 1, id="flash_attn-BLNHC"),
    pytest.param("FLASHINFER", "BLHNC", 1, id="flashinfer-BLHNC"),
]


def _span() -> Span:
    """The request's whole prompt, as the scheduler side names it."""
    chain = CFG.chain(torch.tensor(TOKENS))
    return Span.of(chain, 0, len(chain))


def _save_spec(blocks: list[int]) -> SaveSpec:
    return SaveSpec("r", TOKENS, blocks, [_span()])


def _load_spec(blocks: list[int], sizes: list[int]) -> LoadSpec:
    return LoadSpec("r", TOKENS, 0, len(TOKENS), blocks, [_span()], [()], [sizes])


def vllm_caches(layout: str, ratio: int, device: str, fill: float = 0.0) -> list[torch.Tensor]:
    """Per layer, the ``[blocks, heads, block_size, 2 * head_size]`` view vLLM hands a connector
    of one allocation laid out as ``layout``, in kernel blocks (``ratio`` per scheduler block)."""
    logical = (LAYERS, NUM_BLOCKS * ratio, KV_HEADS, BLOCK // ratio, 2 * HEAD_SIZE)
    order = LAYOUTS[layout]
    memory = torch.full([logical[axis] for axis in order], fill, dtype=torch.bfloat16, device=device)
    return list(memory.permute(*[order.index(axis) for axis in range(5)]).unbind(0))


def reference() -> torch.Tensor:
    """The request's KV, ``[layers, 2, heads, tokens, head_size]``."""
    generator = torch.Generator().manual_seed(21)
    return torch.randn(LAYERS, 2, KV_HEADS, len(TOKENS), HEAD_SIZE, generator=generator).to(torch.bfloat16)


def kernel_blocks(ratio: int) -> list[int]:
    """The request's kernel blocks in token order: each scheduler block's ``ratio`` in a row."""
    return [block * ratio + part for block in REQUEST_BLOCKS for part in range(ratio)]


def write_request(caches: list[torch.Tensor], kv: torch.Tensor, ratio: int, blocks: torch.Tensor | None = None) -> None:
    """Put ``kv`` into the request's blocks (``blocks``, their kernel blocks on the caches'
    device, or computed here), token ``t`` at slot ``t % kernel_block`` of its kernel block."""
    if blocks is None:
        blocks = torch.tensor(kernel_blocks(ratio), device=caches[0].device)
    for layer, cache in enumerate(caches):
        for part in range(2):
            tokens = kv[layer, part].to(cache.device)  # [heads, tokens, head_size]
            paged = tokens.reshape(KV_HEADS, len(blocks), BLOCK // ratio, HEAD_SIZE).transpose(0, 1)
            cache[blocks, :, :, part * HEAD_SIZE : (part + 1) * HEAD_SIZE] = paged


def expected_caches(layout: str, ratio: int, kv: torch.Tensor | None, fill: float = 0.0) -> list[torch.Tensor]:
    """On the CPU: what the caches hold once the request's blocks hold ``kv`` (if given)."""
    caches = vllm_caches(layout, ratio, "cpu", fill)
    if kv is not None:
        write_request(caches, kv, ratio)
    return caches


def make_worker(store: Path, loop: BackgroundLoop, caches: list[torch.Tensor], backend: str, ratio: int) -> WorkerSide:
    layers = [PagedLayer(f"model.layers.{i}.self_attn.attn", c, backend, HEAD_SIZE, None) for i, c in enumerate(caches)]
    heads = HeadRange.all(KV_HEADS)
    return WorkerSide(
        AsyncVUA(CFG, store, strict=True), 0, heads, heads, layers, ratio, BLOCK, loop, Recorder(),
        Problems(logging.getLogger(__name__), "gpu-test"),
        max_pending_save_bytes=1 << 26, flush_timeout_s=60.0, where=str(store),
    )  # fmt: skip


def save(worker: WorkerSide) -> None:
    worker.start_saves(Plan(saves=[_save_spec(REQUEST_BLOCKS)]))
    worker.flush(["r"])


def load(worker: WorkerSide, loop: BackgroundLoop, store: Path) -> set[int]:
    sizes = loop.run(AsyncVUA(CFG, store).stored_sizes(torch.tensor(TOKENS)))
    worker.start_loads(Plan(loads=[_load_spec(REQUEST_BLOCKS, sizes)]))
    deadline = time.monotonic() + 60
    while "r" not in worker.finished(set())[1]:
        assert time.monotonic() < deadline, "the load did not end"
        time.sleep(0.01)
    return worker.load_errors()


def stored_kv(store: Path) -> torch.Tensor | None:
    """What the store holds for the request, ``[layers, 2, heads, tokens, head_size]``, read on the CPU."""
    with VUA(CFG, store) as vua:
        hit = vua.get_closest(torch.tensor(TOKENS))
    if hit is None or hit.tokens.numel() != len(TOKENS):
        return None
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in hit.data])


def new_stream(device: str) -> contextlib.AbstractContextManager[object]:
    """On CUDA, a fresh stream to run on (ordered after nothing the worker did not wait for)."""
    return torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext()


@pytest.fixture
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop("gpu-paged-test")
    yield background
    background.stop()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("backend", "layout", "ratio"), CACHES)
def test_save_then_load_round_trips_bit_exact(
    device: str, backend: str, layout: str, ratio: int, tmp_path: Path, loop: BackgroundLoop
) -> None:
    kv = reference()
    source = vllm_caches(layout, ratio, device, fill=-3.0)  # other blocks hold something else
    write_request(source, kv, ratio)
    worker = make_worker(tmp_path, loop, source, backend, ratio)
    save(worker)
    worker.shutdown()
    got = stored_kv(tmp_path)
    assert got is not None and same_bits(got, kv)

    target = vllm_caches(layout, ratio, device)
    worker = make_worker(tmp_path, loop, target, backend, ratio)
    assert load(worker, loop, tmp_path) == set()
    # At once, on a stream of its own: the load has ended, so its writes are visible to any stream.
    with new_stream(device):
        loaded = [same_bits(c, want) for c, want in zip(target, expected_caches(layout, ratio, kv), strict=True)]
    worker.shutdown()
    assert loaded == [True] * LAYERS


def _busy(device: str) -> None:
    """Keep ``device``'s current stream busy for tens of milliseconds (nothing on the CPU)."""
    if device == "cuda":
        x = torch.rand(4096, 4096, device=device)
        for _ in range(30):
            x = torch.tanh(x @ x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("backend", "layout", "ratio"), CACHES[:3])
def test_capture_waits_for_the_compute_stream_and_is_done_at_the_flush(
    device: str, backend: str, layout: str, ratio: int, tmp_path: Path, loop: BackgroundLoop
) -> None:
    kv = reference().to(device)
    caches = vllm_caches(layout, ratio, device)
    worker = make_worker(tmp_path, loop, caches, backend, ratio)
    # Index tensors first: making one from a list waits for the stream it is made on.
    request = torch.tensor(kernel_blocks(ratio), device=device)
    others = [b * ratio + p for b in range(NUM_BLOCKS) if b not in REQUEST_BLOCKS for p in range(ratio)]
    other_blocks = torch.tensor(others, device=device)
    writer = torch.cuda.Stream() if device == "cuda" else None
    with new_stream(device):  # the compute stream, not the default one (which orders everything)
        # The forward pass: busy, then the request's last KV writes, queued; the host does not wait.
        _busy(device)
        write_request(caches, kv, ratio, request)
        worker.start_saves(Plan(saves=[_save_spec(REQUEST_BLOCKS)]))
        # Meanwhile another stream writes other blocks.
        with torch.cuda.stream(writer) if writer is not None else contextlib.nullcontext():
            for step in range(20):
                for cache in caches:
                    cache[other_blocks] = float(step)
        worker.flush(["r"])
        # After the flush the next step may reuse the request's blocks: the capture is done.
        for cache in caches:
            cache[request] = 7.0
    worker.shutdown()
    if writer is not None:
        writer.synchronize()
    got = stored_kv(tmp_path)
    assert got is not None and same_bits(got, kv.cpu())
    assert all(bool((cache[other_blocks] == 19.0).all()) for cache in caches)


@pytest.mark.parametrize(
    "shape",
    [(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_SIZE), (NUM_BLOCKS, 2, BLOCK, KV_HEADS, HEAD_SIZE)],
    ids=["flash_attn-before-0.3x", "flashinfer-before-0.3x"],
)
def test_the_older_five_dimensional_layouts_are_refused_not_misread(shape: tuple[int, ...]) -> None:
    """vLLM before the logical [B, H, N, C] view handed FlashAttention's [2, blocks, block_size,
    heads, head_size] and FlashInfer's [blocks, 2, ...] caches; those must fail, never be misread."""
    with pytest.raises(ValueError, match="expected a"):
        PagedLayer("model.layers.0.self_attn.attn", torch.zeros(shape), "FLASH_ATTN", HEAD_SIZE, None)
