"""What the GPU tests share: every test runs on the CPU (so CI runs its logic) and on CUDA
where there is a device; the sizes of each; where their POSIX stores go."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import pytest
import torch

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): the cuda case runs on a GPU machine (docs/gpu.md)"
CUDA = torch.cuda.is_available()


def on(device: str, *values: object, id: str = "") -> Any:
    """One parameter on ``device`` (``cpu`` or ``cuda``): the device, or with ``values`` the
    tuple ``(device, *values)``; the cuda one skips, saying why, without a device."""
    marks = [pytest.mark.skipif(not CUDA, reason=NO_CUDA)] if device == "cuda" else []
    value = (device, *values) if values else device
    return pytest.param(value, id="-".join(filter(None, [device, id])), marks=marks)


#: ``cpu`` always; ``cuda`` skipped, with its reason, without a device.
DEVICES = [on("cpu"), on("cuda")]


@dataclass(frozen=True)
class Size:
    layers: int
    kv_heads: int
    head_dim: int
    tokens: int
    split_factor: int = 256


#: Llama-3-8B's KV shape with 8k tokens on CUDA (1 GiB in bf16; VUA_GPU_TEST_TOKENS shortens
#: it); a slice of it on the CPU, small enough for CI.
SIZES = {
    "cpu": Size(layers=4, kv_heads=8, head_dim=128, tokens=512),
    "cuda": Size(layers=32, kv_heads=8, head_dim=128, tokens=int(os.environ.get("VUA_GPU_TEST_TOKENS", "8192"))),
}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def posix_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh directory for a POSIX store: under ``$VUA_GPU_POSIX_DIR`` (scripts/gpu_check.sh
    points it at /dev/shm when that has room), else pytest's temporary directory."""
    parent = os.environ.get("VUA_GPU_POSIX_DIR")
    if parent:
        return tempfile.mkdtemp(prefix="vua-s3-gpu-test-", dir=parent)
    return str(tmp_path_factory.mktemp("store"))


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-exact equality (dtype and shape included), compared on ``got``'s device."""
    return (
        got.dtype == want.dtype
        and got.shape == want.shape
        and torch.equal(got.contiguous().view(torch.uint8), want.to(got.device).contiguous().view(torch.uint8))
    )
