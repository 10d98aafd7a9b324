"""The first ``get_closest`` of a fresh process, for the bench's cold figure: run as
``python -m vua_s3.bench.cold SPEC.json`` and print its wall and CPU seconds as JSON.

Imports are done before the clock starts; the store's client, connections and bucket
check are not (a new serving process pays them on its first query)."""

from __future__ import annotations

import json
import sys
import time

import torch

from ..config import VUAConfig
from ..sync import VUA


def main(argv: list[str]) -> int:
    with open(argv[0]) as file:
        spec = json.load(file)
    tokens = torch.load(spec["tokens"])
    config = VUAConfig(split_factor=spec["split_factor"], namespace=spec["namespace"])
    with VUA(config, spec["location"]) as vua:
        cpu, wall = time.process_time(), time.perf_counter()
        found = vua.get_closest(tokens, salt=spec["salt"])
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": 0 if found is None else found.tokens.numel()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
