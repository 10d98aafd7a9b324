"""Check that fragments a vLLM engine stored hold the model's real K and V.

Runs in the vLLM venv: recomputes the prompt's KV cache with Hugging Face
transformers (an independent implementation of the same checkpoint) and compares it,
layer by layer, with what ``VUA.get_closest`` reads from the store. Passing proves the
connector maps vLLM's paged layout to the shared ``[layers, 2, heads, S, head_dim]``
format correctly (K vs V, heads, token order), not merely consistently with itself.

    python hf_kv_check.py MODEL_DIR LOCATION NAMESPACE SPLIT_FACTOR PROMPT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
from stored import connector_config
from transformers import LlamaForCausalLM

from vua_s3 import VUA


def main() -> None:
    model_dir, location, namespace, split, prompt_json = sys.argv[1:6]
    prompt = torch.tensor(json.loads(prompt_json))
    with VUA(connector_config(location, namespace, int(split)), location) as vua:
        stored = vua.get_closest(prompt)
    assert stored is not None, "nothing stored for the prompt"
    length = stored.tokens.numel()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(prompt[:length].unsqueeze(0), use_cache=True).past_key_values
    worst = 0.0
    for layer, (keys, values) in enumerate(stored.data):
        ref_keys, ref_values = cache.layers[layer].keys, cache.layers[layer].values
        for name, got, ref in (("K", keys, ref_keys), ("V", values, ref_values)):
            assert got.shape == ref.shape, f"layer {layer} {name}: {list(got.shape)} != {list(ref.shape)}"
            try:
                torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
            except AssertionError as exc:
                raise AssertionError(f"layer {layer} {name}: {exc}") from None
            worst = max(worst, float((got - ref).abs().max()))
    print(json.dumps({"tokens": length, "layers": len(stored.data), "max_abs_diff": worst}))


if __name__ == "__main__":
    main()
