"""Key layout: deterministic, prefix-chained, namespaced."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from vua_s3 import VUAConfig

CFG = VUAConfig(split_factor=4, namespace="ns")
SCRIPT = (
    "import torch; from vua_s3 import VUAConfig; "
    "print(' '.join(VUAConfig(split_factor=4, namespace='ns').tokens_to_paths(torch.arange(100, 116))))"
)


def test_keys_are_the_same_in_processes_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.append(out.stdout.split())
    assert outputs[0] == outputs[1] == CFG.tokens_to_paths(torch.arange(100, 116))


def test_key_shape_and_prefix_chaining() -> None:
    keys = CFG.tokens_to_paths(torch.arange(12))
    assert len(keys) == 3
    for key in keys:
        namespace, fan, name = key.split("/")
        assert namespace == "ns" and name.startswith(fan) and name.endswith(".h0.safetensors")
        assert len(name) == 64 + len(".h0.safetensors")
    # A change in group 0 renames every later group too; a change in group 2 only group 2.
    changed_first = torch.arange(12)
    changed_first[0] = 99
    assert all(a != b for a, b in zip(keys, CFG.tokens_to_paths(changed_first), strict=True))
    changed_last = torch.arange(12)
    changed_last[11] = 99
    assert CFG.tokens_to_paths(changed_last)[:2] == keys[:2] and CFG.tokens_to_paths(changed_last)[2] != keys[2]


def test_token_dtype_does_not_change_keys() -> None:
    ids = torch.arange(8)
    assert CFG.tokens_to_paths(ids.to(torch.int32)) == CFG.tokens_to_paths(ids) == CFG.tokens_to_paths(ids[None])


def test_namespace_and_salt_change_every_key() -> None:
    ids = torch.arange(8)
    base = CFG.tokens_to_paths(ids)
    other = VUAConfig(split_factor=4, namespace="other").tokens_to_paths(ids)
    salted = CFG.tokens_to_paths(ids, salt="tenant")
    assert not set(base) & set(other) and not set(base) & set(salted)
