"""The example scripts stay in step with the code they configure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from vua_s3.integrations.vllm.settings import ConnectorSettings

ROOT = Path(__file__).resolve().parents[1]


def test_serve_vllm_config_is_accepted_by_the_connector() -> None:
    """The kv-transfer config examples/serve_vllm.sh builds passes the connector's start-up check."""
    script = (ROOT / "examples" / "serve_vllm.sh").read_text()
    program = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert program, "serve_vllm.sh no longer builds its config with an inline python program"
    url = "s3://bucket/kv?endpoint_url=http://127.0.0.1:9000"
    out = subprocess.run([sys.executable, "-", url], input=program.group(1), capture_output=True, text=True, check=True)
    config = json.loads(out.stdout)
    assert config["kv_connector"] == "VUAS3Connector"
    settings = ConnectorSettings.from_extra_config(config["kv_connector_extra_config"])
    assert settings.url == url
