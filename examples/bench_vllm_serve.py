"""The serving benchmark is a command now: ``vua-s3 bench-vllm`` (see ``docs/vllm.md``).

python examples/bench_vllm_serve.py --workload chat   # same as: vua-s3 bench-vllm --workload chat
"""

import sys

from vua_s3.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench-vllm", *sys.argv[1:]]))
