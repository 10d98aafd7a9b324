"""The connector's metrics in ``vllm serve``'s ``/metrics``, read over real HTTP.

One server (prefix caching off, so a repeated prompt goes to the store) as
``vua-s3 bench-vllm`` starts them: a prompt is stored, then asked again and loaded;
the ``vllm:vua_s3_*`` counters show the lookups, the hit and the bytes both ways.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vua_s3.bench.serving import complete, serve
from vua_s3.testing.moto import EmbeddedS3

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm-engines")]


def test_metrics_in_vllm_serve(vllm_python: Path, tiny_llama: Path, tmp_path: Path) -> None:
    prompt = list(range(3, 3 + 150))
    extra = ("--no-enable-prefix-caching", "--max-model-len", "1024")
    with EmbeddedS3() as s3, serve(vllm_python, tiny_llama, s3.url("serve"), tmp_path / "serve.log",
                                   split_factor=64, extra_args=extra) as server:  # fmt: skip
        model = str(tiny_llama)
        _, tokens = complete(server.base, model, prompt, 4)
        assert tokens == 4
        deadline = time.monotonic() + 60
        while server.metrics().get("stored_groups", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        complete(server.base, model, prompt, 4)
        found = server.metrics()
    assert found["stored_groups"] == 2, found
    assert found["lookups"] == 1, found  # the second: groups this engine stored are trusted, not probed
    assert found["hit_tokens"] == 128, found
    assert found["loaded_tokens"] == 128, found
    assert found["load_bytes"] > 0 and found["store_bytes"] > 0, found
    assert found["lookup_heads"] == 2 + 1, found  # the first lookup's two groups, and the start-up probe
    assert found["breaker_open"] == 0, found
