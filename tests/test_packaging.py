"""What a user installs and imports: the core pulls no test server, a POSIX user imports no S3
client, and the demo says what to install when the embedded server is missing."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import vua_s3

TEST_SERVERS = ("moto", "flask", "werkzeug", "docker", "cfn-lint")


def core_requirements() -> list[str]:
    requires = importlib.metadata.requires("vua_s3") or []
    return [r for r in requires if "extra ==" not in r]


def test_core_dependencies_hold_no_test_server() -> None:
    core = core_requirements()
    assert core, "vua_s3's metadata lists no requirements: is it installed?"
    names = [r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in core]
    assert "torch" in names and "aioboto3" in names
    assert not [n for n in names if n in TEST_SERVERS], core
    embedded = [r for r in importlib.metadata.requires("vua_s3") or [] if 'extra == "embedded"' in r]
    assert any(r.startswith("moto") for r in embedded)


def test_package_is_typed() -> None:
    assert (Path(vua_s3.__file__).parent / "py.typed").is_file()


def test_posix_use_imports_no_s3_client_or_server(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from vua_s3 import VUA, VUAConfig\n"
        f"with VUA(VUAConfig(split_factor=4), {str(tmp_path)!r}) as v:\n"
        "    v.put(torch.arange(8), [(torch.ones(1, 1, 8, 2), torch.ones(1, 1, 8, 2))])\n"
        "    assert v.get_closest(torch.arange(8)) is not None\n"
        "print(sorted(m for m in ('botocore', 'aioboto3', 'aiohttp', 'moto') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_demo_without_moto_says_what_to_install_and_runs_on_posix() -> None:
    code = (
        "import sys; sys.modules['moto'] = None  # as if the embedded extra were not installed\n"
        "from vua_s3.cli.main import main\n"
        "sys.exit(main(['demo', '--model', 'tiny', '--tokens', '512']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "pip install 'vua_s3[embedded]'" in out.stdout
    assert "temporary POSIX directory" in out.stdout
    assert "round trip bit-exact: yes" in out.stdout
