"""Store a prompt's KV cache as Hugging Face transformers computes it, through ``VUA.put``.

Runs in the vLLM venv: the VUA API (all heads, no tensor parallelism) writes the objects
a vLLM engine of any TP size must then find and use.

    python hf_kv_put.py MODEL_DIR LOCATION NAMESPACE SPLIT_FACTOR PROMPT_JSON
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
    config = connector_config(location, namespace, int(split))
    length = prompt.numel() // config.split_factor * config.split_factor
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(prompt[:length].unsqueeze(0), use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    with VUA(config, location) as vua:
        print(json.dumps({"groups": vua.put(prompt[:length], kv)}))


if __name__ == "__main__":
    main()
