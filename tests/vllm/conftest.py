"""Fixtures for the real-engine tests: the vLLM venv and a tiny checkpoint.

vLLM pins its own torch and transformers, so engines run in their own venv
(``scripts/vllm_venv.sh``, built on first use, reused after), each in a fresh process.
Every test file here is in the xdist group ``vllm-engines``: under ``scripts/test.sh``
(``-n 2 --dist loadgroup``) the engines run one at a time on one worker, the rest beside them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs real vLLM engines (minutes); deselect with -m 'not vllm'")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM venv's python. Building it needs the package index; if that fails the
    test fails, unless VUA_SKIP_VLLM=1 says this machine cannot run vLLM."""
    if os.environ.get("VUA_SKIP_VLLM") == "1":
        pytest.skip("VUA_SKIP_VLLM=1")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "vllm_venv.sh")], capture_output=True, text=True, timeout=3600, check=False
    )
    if proc.returncode:
        pytest.fail(f"could not create the vLLM venv (set VUA_SKIP_VLLM=1 to skip):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


@pytest.fixture(scope="session")
def tiny_llama(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written by the vLLM venv, which has the numpy that safetensors' writer needs."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([str(vllm_python), str(Path(__file__).with_name("tiny_model.py")), str(directory)], check=True)
    return directory
