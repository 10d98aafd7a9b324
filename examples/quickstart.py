"""Store a KV cache for a prompt, then load the longest stored prefix of a longer one.

python examples/quickstart.py                      # an embedded S3 server on 127.0.0.1
python examples/quickstart.py s3://bucket/prefix   # any store (credentials from the AWS chain)
"""

from __future__ import annotations

import sys

import torch

from vua_s3 import VUA, Store, VUAConfig


def main(location: str | Store) -> None:
    config = VUAConfig(split_factor=256, namespace="quickstart-model")
    layers, kv_heads, head_dim = 4, 8, 128
    prompt = torch.randint(0, 128_000, (1024,))
    kvcache = [
        (torch.randn(1, kv_heads, 1024, head_dim), torch.randn(1, kv_heads, 1024, head_dim)) for _ in range(layers)
    ]
    with VUA(config, location) as vua:
        print("fragments written:", vua.put(prompt, kvcache))
        longer = torch.cat([prompt, torch.randint(0, 128_000, (700,))])
        print("tokens stored for the longer prompt:", vua.lookup(longer))
        hit = vua.get_closest(longer, device="cpu")
        assert hit is not None
        print("loaded", hit.tokens.numel(), "tokens;", "layer 0 K shape", tuple(hit.data[0][0].shape))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        from vua_s3.testing.moto import EmbeddedS3

        with EmbeddedS3() as server:
            main(server.store("quickstart"))
