"""Time to first token with and without a stored prompt prefix, for a HuggingFace Llama.

The model is built from a config with random weights (nothing is downloaded): ``tiny``
(2 layers, for tests) or ``1b`` (Llama-3.2-1B shapes). Each prompt is a context of
``length`` tokens followed by a ``--suffix``-token question. Cold: the cache is empty,
so the whole prompt is prefilled and its full groups are stored. Warm: the same prompt
again, so the context's KV is probed and loaded and only the question is run.

    python examples/transformers_ttft.py --size 1b --lengths 1024,4096
    python examples/transformers_ttft.py --size tiny --url /tmp/kv    # POSIX instead of the embedded S3

Without ``--url`` the cache is the embedded S3 server (moto on 127.0.0.1; slow,
Python-served), so load times are an upper bound for a real object store.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vua_s3.integrations.transformers import CachedPrefill, cached_prefill, kv_layout, vua_for_model
from vua_s3.testing.moto import EmbeddedS3

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
}
DEFAULT_LENGTHS = {"tiny": "256,512", "1b": "1024,4096,8192"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(size: str, dtype: torch.dtype, attn: str) -> LlamaForCausalLM:
    """A Llama of the given shape with seeded random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=131072)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config)  # fp32
    if dtype == torch.bfloat16:
        model = model.bfloat16()
    model.train(False)
    return model


@contextlib.contextmanager
def cache_location(url: str | None) -> Iterator[Any]:
    """The user's location, or a fresh prefix on an embedded S3 server that lives as long as the run."""
    if url:
        yield url
        return
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's per-request log
    with EmbeddedS3() as s3:
        yield s3.store(f"ttft-{uuid.uuid4().hex[:8]}")


def timed_prefill(model: LlamaForCausalLM, ids: torch.Tensor, vua: Any) -> tuple[CachedPrefill, int, float]:
    """One helper call and the first token it gives, with its wall time (the TTFT)."""
    start = time.perf_counter()
    result = cached_prefill(model, ids, vua, logits_to_keep=1)
    token = int(result.logits[0, -1].argmax())
    return result, token, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lengths", help="context lengths, comma-separated (default: by size)")
    parser.add_argument("--suffix", type=int, default=32, help="tokens after the stored context (the question)")
    parser.add_argument("--split-factor", type=int, default=256)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    parser.add_argument("--url", help="cache location (s3://... or a path); default: an embedded S3 server")
    args = parser.parse_args()
    lengths = [int(n) for n in (args.lengths or DEFAULT_LENGTHS[args.size]).split(",")]
    dtype = DTYPES[args.dtype]

    started = time.perf_counter()
    model = build_model(args.size, dtype, args.attn)
    layers, heads, head_dim = kv_layout(model.config)
    token_bytes = layers * 2 * heads * head_dim * dtype.itemsize
    print(
        f"model: Llama {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.dtype}, "
        f"{args.attn} attention), built in {time.perf_counter() - started:.1f} s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with torch.no_grad():  # warm up kernels and the allocator outside the measurement
        model(torch.zeros((1, args.suffix), dtype=torch.long), logits_to_keep=1)

    header = (
        f"{'prompt':>7} {'cached':>7} {'KV MiB':>8} {'prefill s':>10} {'store s':>8} {'load s':>7} {'suffix s':>9} "
        f"{'TTFT cold':>10} {'TTFT warm':>10} {'speedup':>8} {'max|dlogit|':>12}"
    )
    diffs = []
    with cache_location(args.url) as location, vua_for_model(model, location, split_factor=args.split_factor) as vua:
        print(f"cache: {vua.store.url}  namespace {vua.config().namespace}")
        print(header)
        for index, length in enumerate(lengths):
            generator = torch.Generator().manual_seed(1000 + index)
            ids = torch.randint(0, model.config.vocab_size, (1, length + args.suffix), generator=generator)
            cold, cold_token, cold_s = timed_prefill(model, ids, vua)
            warm, warm_token, warm_s = timed_prefill(model, ids, vua)
            diff = (cold.logits[0, -1].float() - warm.logits[0, -1].float()).abs().max().item()
            diffs.append(diff)
            if cold.cached_tokens or warm.cached_tokens != length - length % args.split_factor:
                raise SystemExit(
                    f"unexpected cache state: cold hit {cold.cached_tokens}, warm hit {warm.cached_tokens}"
                )
            print(
                f"{ids.size(1):>7} {warm.cached_tokens:>7} {warm.cached_tokens * token_bytes / 2**20:>8.1f} "
                f"{cold.timings['forward']:>10.3f} {cold.timings['store']:>8.3f} {warm.timings['load']:>7.3f} "
                f"{warm.timings['forward']:>9.3f} {cold_s:>10.3f} {warm_s:>10.3f} {cold_s / warm_s:>7.1f}x "
                f"{diff:>12.3g}" + ("" if cold_token == warm_token else "  (first token differs)")
            )
    print(
        "TTFT cold = probe (miss) + full prefill + store of the full groups; "
        "TTFT warm = probe + load + suffix forward (each includes the first token's argmax)"
    )
    if all(d == 0 for d in diffs):
        print(f"logits: exact (max abs diff 0 between warm and cold at every length, {args.dtype})")
    else:
        print(f"logits: max abs diff {max(diffs):.3g} between warm and cold ({args.dtype}); not bit-identical")


if __name__ == "__main__":
    main()
