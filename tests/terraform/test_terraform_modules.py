"""Offline checks for the Terraform modules in terraform/aws and terraform/vast.

Terraform providers cannot be downloaded here, so ``terraform init/validate/plan``
never run. What is checked instead:

* every ``.tf`` file parses (python-hcl2) and the resources are wired as the
  issue asks (public access block, lifecycle, TLS-only policy, scoped IAM ...);
* the policy documents, derived names and variable validations are evaluated by
  Terraform itself: the module's ``variables.tf`` and ``policies.tf`` are copied
  into a scratch directory next to a stub for the three provider-derived locals
  (partition, DNS suffix, region) and ``terraform console`` evaluates them.
  Neither file declares a provider, so no download is needed. Lifecycle rules
  are resource blocks, not JSON: the test maps their parsed blocks onto the S3
  API shape (the same field mapping the AWS provider does) after Terraform has
  evaluated each attribute expression;
* the rendered lifecycle rules and policies are sent to a moto server over real
  HTTP on 127.0.0.1 (PutBucketLifecycleConfiguration, PutBucketPolicy, and IAM
  CreatePolicy, whose policy-grammar validator is stricter than moto's S3);
* checkov (if a ``checkov`` executable is found) and ``terraform fmt``.

Tests that need the terraform CLI or checkov skip with the reason when missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import hcl2
import pytest
from hcl2 import SerializationOptions
from moto.server import ThreadedMotoServer

REPO = Path(__file__).resolve().parents[2]
TF_ROOT = REPO / "terraform"
AWS = TF_ROOT / "aws"
VAST = TF_ROOT / "vast"
MODULES = (AWS, VAST)

# Stand-ins for what the AWS provider would report; only main.tf's first
# locals block reads them from data sources.
AWS_PROVIDER_STUBS = {
    "partition": "aws",
    "dns_suffix": "amazonaws.com",
    "region": "us-west-2",
}
AWS_VARS = {"bucket_name": "vua-kv-cache-test", "prefix": "kv/llama3"}
VAST_VARS = {
    "bucket_name": "vua-kv-cache",
    "prefix": "vua",
    "endpoint": "s3.vast.example.com",
    "service_user_uid": 7001,
}
KMS_ARN = "arn:aws:kms:us-west-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
DUMMY_CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


# --------------------------------------------------------------------------
# HCL parsing
# --------------------------------------------------------------------------


@functools.cache
def _parse(path: Path, raw: bool) -> dict[str, Any]:
    """Parse one file. raw=True keeps HCL literals quoted, so each value is a
    valid Terraform expression; raw=False gives plain strings for assertions."""
    options = SerializationOptions(strip_string_quotes=not raw, explicit_blocks=False, with_comments=False)
    with path.open(encoding="utf-8") as fh:
        return hcl2.load(fh, serialization_options=options)


def _module_files(module: Path) -> list[Path]:
    return sorted(module.glob("*.tf"))


def _blocks(module: Path, kind: str, raw: bool = False) -> dict[str, Any]:
    """Merge top-level labelled blocks ('resource', 'data', 'variable', 'output')
    of all files of a module. resource/data -> {type: {name: body}}."""
    merged: dict[str, Any] = {}
    for path in _module_files(module):
        for entry in _parse(path, raw).get(kind, []):
            for quoted, body in entry.items():
                label = quoted.strip('"')  # raw mode keeps labels quoted
                if kind in ("resource", "data"):
                    for name, inner in body.items():
                        merged.setdefault(label, {})[name.strip('"')] = inner
                else:
                    merged[label] = body
    return merged


def _resource(module: Path, rtype: str, name: str, raw: bool = False) -> dict[str, Any]:
    resources = _blocks(module, "resource", raw)
    assert rtype in resources, f"no {rtype} resource"
    assert name in resources[rtype], f"{rtype}.{name} missing"
    return resources[rtype][name]


def _one(block_list: Any) -> dict[str, Any]:
    assert isinstance(block_list, list), block_list
    assert len(block_list) == 1, block_list
    return block_list[0]


def _expr(value: Any) -> str:
    """A raw-parsed HCL value as a Terraform expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        if value.startswith("${") and value.endswith("}") and value.count("${") == 1:
            return value[2:-1]
        return value  # an HCL string literal or template, still quoted
    raise TypeError(f"cannot turn {value!r} into an expression")


# --------------------------------------------------------------------------
# Rendering with terraform console (no providers involved)
# --------------------------------------------------------------------------


def _terraform() -> str | None:
    return os.environ.get("TERRAFORM_BIN") or shutil.which("terraform")


needs_terraform = pytest.mark.skipif(
    _terraform() is None,
    reason="terraform CLI not found (set TERRAFORM_BIN or put terraform on PATH); "
    "rendering, variable validation and fmt checks need it, offline",
)


class ConsoleError(RuntimeError):
    pass


class Renderer:
    """Evaluates expressions against a module's variables.tf + policies.tf."""

    def __init__(self, module: Path, workdir: Path, stubs: Mapping[str, str]) -> None:
        self.workdir = workdir
        for name in ("variables.tf", "policies.tf"):
            shutil.copy(module / name, workdir / name)
        if stubs:
            body = "\n".join(f"  {k} = {json.dumps(v)}" for k, v in stubs.items())
            (workdir / "provider_stubs.tf").write_text(f"locals {{\n{body}\n}}\n")
        (workdir / "empty.tfrc").write_text("")

    def eval(self, expressions: Mapping[str, str], tfvars: Mapping[str, Any]) -> dict[str, Any]:
        (self.workdir / "terraform.tfvars.json").write_text(json.dumps(tfvars))
        fields = ", ".join(f"{key} = ({expr})" for key, expr in expressions.items())
        env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
        env.update(
            CHECKPOINT_DISABLE="1",
            TF_IN_AUTOMATION="1",
            TF_INPUT="0",
            TF_CLI_CONFIG_FILE=str(self.workdir / "empty.tfrc"),
        )
        terraform = _terraform()
        assert terraform is not None
        proc = subprocess.run(
            [terraform, "console"],
            input=f"jsonencode({{{fields}}})\n",
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        stderr = re.sub(r"\x1b\[[0-9;]*m", "", proc.stderr)
        # A failed variable validation is reported as an error diagnostic, yet
        # console still exits 0 and prints a value: treat any error as failure.
        if proc.returncode != 0 or "Error:" in stderr:
            raise ConsoleError(stderr + proc.stdout)
        # The value is the last line; it is an HCL string literal whose escapes
        # are JSON's, plus the template escapes $${ and %%{.
        literal = proc.stdout.strip().splitlines()[-1]
        literal = literal.replace("$${", "${").replace("%%{", "%{")
        return json.loads(json.loads(literal))


@pytest.fixture(scope="module")
def aws_renderer(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    if _terraform() is None:
        pytest.skip("terraform CLI not found; cannot render the module offline")
    return Renderer(AWS, tmp_path_factory.mktemp("render-aws"), AWS_PROVIDER_STUBS)


@pytest.fixture(scope="module")
def vast_renderer(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    if _terraform() is None:
        pytest.skip("terraform CLI not found; cannot render the module offline")
    return Renderer(VAST, tmp_path_factory.mktemp("render-vast"), {})


def _aws_documents(r: Renderer, **tfvars: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    out = r.eval(
        {"bucket": "local.bucket_policy_json", "iam": "local.inference_policy_json"},
        {**AWS_VARS, **tfvars},
    )
    return json.loads(out["bucket"]), json.loads(out["iam"])


def _vast_policy(r: Renderer, **tfvars: Any) -> dict[str, Any]:
    out = r.eval({"p": "local.s3_policy_json"}, {**VAST_VARS, **tfvars})
    return json.loads(out["p"])


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------
# Lifecycle: HCL blocks -> S3 API LifecycleConfiguration
# --------------------------------------------------------------------------


def _aws_lifecycle_rules(r: Renderer, tfvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Translate aws_s3_bucket_lifecycle_configuration.cache into boto3's shape.

    Field mapping as in the AWS provider. Attribute expressions are evaluated
    by terraform console; any block this translator does not know fails."""
    rules = _resource(AWS, "aws_s3_bucket_lifecycle_configuration", "cache", raw=True)["rule"]
    exprs: dict[str, str] = {}
    plan: list[list[tuple[tuple[str, ...], str]]] = []
    for i, rule in enumerate(rules):
        fields: list[tuple[tuple[str, ...], str]] = []

        def add(path: tuple[str, ...], value: Any, i: int = i, fields: Any = fields) -> None:
            key = f"r{i}_{len(fields)}"
            exprs[key] = _expr(value)
            fields.append((path, key))

        for attr, value in rule.items():
            if attr == "id":
                add(("ID",), value)
            elif attr == "status":
                add(("Status",), value)
            elif attr == "filter":
                body = _one(value)
                extra = set(body) - {"prefix"}
                assert not extra, f"filter attributes not translated: {extra}"
                if "prefix" in body:
                    add(("Filter", "Prefix"), body["prefix"])
                else:
                    fields.append((("Filter",), ""))
            elif attr == "expiration":
                body = _one(value)
                assert set(body) == {"days"}, body
                add(("Expiration", "Days"), body["days"])
            elif attr == "noncurrent_version_expiration":
                body = _one(value)
                assert set(body) == {"noncurrent_days"}, body
                add(
                    ("NoncurrentVersionExpiration", "NoncurrentDays"),
                    body["noncurrent_days"],
                )
            elif attr == "abort_incomplete_multipart_upload":
                body = _one(value)
                assert set(body) == {"days_after_initiation"}, body
                add(
                    ("AbortIncompleteMultipartUpload", "DaysAfterInitiation"),
                    body["days_after_initiation"],
                )
            else:
                raise AssertionError(f"lifecycle rule attribute {attr!r} not translated")
        plan.append(fields)

    values = r.eval(exprs, {**AWS_VARS, **tfvars})
    api_rules: list[dict[str, Any]] = []
    for fields in plan:
        api_rule: dict[str, Any] = {}
        for path, key in fields:
            node = api_rule
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = {} if key == "" else values[key]
        api_rules.append(api_rule)
    return api_rules


def _vast_lifecycle_rules(r: Renderer, tfvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The vastdata_s3_life_cycle_rule resources expressed as S3 API rules."""
    rules = _blocks(VAST, "resource", raw=True)["vastdata_s3_life_cycle_rule"]
    mapping = {
        "prefix": ("Filter", "Prefix"),
        "expiration_days": ("Expiration", "Days"),
        "abort_mpu_days_after_initiation": (
            "AbortIncompleteMultipartUpload",
            "DaysAfterInitiation",
        ),
        "enabled": ("Status",),
    }
    exprs: dict[str, str] = {}
    for name, body in rules.items():
        for attr, value in body.items():
            if attr in mapping:
                exprs[f"{name}__{attr}"] = _expr(value)
            else:
                assert attr in ("name", "view_id"), f"{attr} not translated"
    values = r.eval(exprs, {**VAST_VARS, **tfvars})
    api_rules = []
    for name, body in sorted(rules.items()):
        api_rule: dict[str, Any] = {"ID": name, "Filter": {}}
        for attr in body:
            if attr not in mapping:
                continue
            value = values[f"{name}__{attr}"]
            if attr == "enabled":
                value = "Enabled" if value else "Disabled"
            node = api_rule
            path = mapping[attr]
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        api_rules.append(api_rule)
    return api_rules


# --------------------------------------------------------------------------
# moto server
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _client(service: str, endpoint: str) -> Any:
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1", **DUMMY_CREDS)


# ==========================================================================
# Tests: structure
# ==========================================================================


def test_every_tf_file_parses() -> None:
    files = sorted(TF_ROOT.rglob("*.tf"))
    assert len(files) >= 12, files
    for path in files:
        assert isinstance(_parse(path, raw=False), dict), path


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_module_layout_and_readme(module: Path) -> None:
    for name in (
        "versions.tf",
        "variables.tf",
        "outputs.tf",
        "main.tf",
        "policies.tf",
        "README.md",
    ):
        assert (module / name).is_file(), f"{module.name}/{name} missing"
    readme = (module / "README.md").read_text(encoding="utf-8")
    usage = [b for b in re.findall(r"```hcl\n(.*?)```", readme, re.DOTALL) if 'module "' in b]
    assert usage, "README needs an hcl usage block with the module"
    assert "source" in usage[0]
    examples = list((module / "examples").rglob("*.tf"))
    assert examples, "examples/ needs a configuration"
    example_text = "\n".join(p.read_text(encoding="utf-8") for p in examples)
    assert 'source = "../.."' in example_text
    example_readmes = list((module / "examples").rglob("README.md"))
    assert example_readmes
    flow = "\n".join(p.read_text(encoding="utf-8") for p in example_readmes)
    for needle in (
        "terraform apply",
        "terraform output",
        "VUAConfig",
        "--kv-transfer-config",
    ):
        assert needle in flow, f"example README lacks {needle!r}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_variables_have_descriptions_and_validation(module: Path) -> None:
    variables = _blocks(module, "variable")
    assert variables
    for name, body in variables.items():
        assert str(body.get("description", "")).strip(), f"variable {name} lacks a description"
        assert "type" in body, f"variable {name} lacks a type"
    for name in (
        "bucket_name",
        "prefix",
        "ttl_days",
        "abort_incomplete_multipart_days",
    ):
        assert variables[name].get("validation"), f"{name} needs validation"
    assert "var.ttl_days > 0" in " ".join(v["condition"] for v in variables["ttl_days"]["validation"])


def test_versions_pin_providers() -> None:
    def providers(module: Path) -> dict[str, Any]:
        terraform = _parse(module / "versions.tf", raw=False)["terraform"][0]
        assert terraform["required_version"].startswith(">=")
        return _one(terraform["required_providers"])

    aws = providers(AWS)["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.fullmatch(r">= \d+\.\d+\.\d+, < \d+\.0\.0", aws["version"]), aws
    vast = providers(VAST)["vastdata"]
    assert vast["source"] == "vast-data/vastdata"
    assert vast["version"] == "~> 2.0"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_policies_tf_has_no_provider_references(module: Path) -> None:
    """The rendering trick relies on policies.tf reading only var.* and local.*."""
    text = (module / "policies.tf").read_text(encoding="utf-8")
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"\b(data|aws_[a-z0-9_]+|vastdata_[a-z0-9_]+)\.", code)
    assert set(_parse(module / "policies.tf", raw=False)) == {"locals"}


# ==========================================================================
# Tests: terraform/aws wiring
# ==========================================================================


def test_aws_public_access_block_all_four_flags_true() -> None:
    pab = _resource(AWS, "aws_s3_bucket_public_access_block", "cache")
    assert pab["bucket"] == "${aws_s3_bucket.cache.id}"
    for flag in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert pab[flag] is True, flag
    ownership = _one(_resource(AWS, "aws_s3_bucket_ownership_controls", "cache")["rule"])
    assert ownership["object_ownership"] == "BucketOwnerEnforced"


@needs_terraform
@pytest.mark.parametrize(
    ("kms", "algorithm", "bucket_key"),
    [(None, "AES256", False), (KMS_ARN, "aws:kms", True)],
)
def test_aws_encryption_sse_s3_default_kms_optional(
    aws_renderer: Renderer, kms: str | None, algorithm: str, bucket_key: bool
) -> None:
    rule = _one(_resource(AWS, "aws_s3_bucket_server_side_encryption_configuration", "cache", raw=True)["rule"])
    default = _one(rule["apply_server_side_encryption_by_default"])
    got = aws_renderer.eval(
        {
            "alg": _expr(default["sse_algorithm"]),
            "key": _expr(default["kms_master_key_id"]),
            "bk": _expr(rule["bucket_key_enabled"]),
        },
        {**AWS_VARS, "kms_key_arn": kms},
    )
    assert got == {"alg": algorithm, "key": kms, "bk": bucket_key}


@needs_terraform
def test_aws_versioning_off_unless_asked(aws_renderer: Renderer) -> None:
    versioning = _resource(AWS, "aws_s3_bucket_versioning", "cache", raw=True)
    count = _expr(versioning["count"])
    assert aws_renderer.eval({"n": count}, AWS_VARS) == {"n": 0}
    assert aws_renderer.eval({"n": count}, {**AWS_VARS, "versioning_enabled": True}) == {"n": 1}


@needs_terraform
def test_aws_lifecycle_uses_ttl_days_and_aborts_multipart(
    aws_renderer: Renderer,
) -> None:
    rules = {r["ID"]: r for r in _aws_lifecycle_rules(aws_renderer, {"ttl_days": 13})}
    expire = rules["expire-kv-fragments"]
    assert expire["Status"] == "Enabled"
    assert expire["Filter"] == {"Prefix": "kv/llama3/"}
    assert expire["Expiration"] == {"Days": 13}
    aborts = [r for r in rules.values() if "AbortIncompleteMultipartUpload" in r]
    assert len(aborts) == 1
    assert aborts[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert aborts[0]["Status"] == "Enabled"
    # and the expression is really var.ttl_days, not a literal
    raw = _resource(AWS, "aws_s3_bucket_lifecycle_configuration", "cache")
    assert _one(raw["rule"][0]["expiration"])["days"] == "${var.ttl_days}"


@needs_terraform
def test_aws_bucket_policy_denies_non_tls(aws_renderer: Renderer) -> None:
    assert _resource(AWS, "aws_s3_bucket_policy", "cache")["policy"] == "${local.bucket_policy_json}"
    bucket_policy, _ = _aws_documents(aws_renderer)
    arn = "arn:aws:s3:::vua-kv-cache-test"
    tls = [
        s
        for s in bucket_policy["Statement"]
        if s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
    ]
    assert len(tls) == 1
    stmt = tls[0]
    assert stmt["Effect"] == "Deny"
    assert stmt["Principal"] == "*"
    assert stmt["Action"] == "s3:*"
    assert sorted(stmt["Resource"]) == [arn, f"{arn}/*"]
    assert all(s["Effect"] == "Deny" for s in bucket_policy["Statement"]), "bucket policy grants nothing"


@needs_terraform
@pytest.mark.parametrize("maintenance", [False, True])
@pytest.mark.parametrize("kms", [None, KMS_ARN])
def test_aws_iam_policy_is_limited_to_prefix(aws_renderer: Renderer, maintenance: bool, kms: str | None) -> None:
    _, policy = _aws_documents(aws_renderer, allow_maintenance=maintenance, kms_key_arn=kms)
    bucket = "arn:aws:s3:::vua-kv-cache-test"
    fragments = f"{bucket}/kv/llama3/*"
    granted: dict[str, set[str]] = {}
    for stmt in policy["Statement"]:
        assert stmt["Effect"] == "Allow"
        actions = _as_list(stmt["Action"])
        resources = _as_list(stmt["Resource"])
        for action in actions:
            assert "*" not in action, action
            granted.setdefault(action, set()).update(resources)
        if "s3:ListBucket" in actions:
            assert resources == [bucket]
            assert stmt["Condition"] == {"StringLike": {"s3:prefix": ["kv/llama3/*"]}}
    object_actions = {
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }
    for action in object_actions:
        assert granted[action] == {fragments}, action
    expected = object_actions | {"s3:ListBucket"}
    if maintenance:
        assert granted["s3:DeleteObject"] == {fragments}
        assert granted["s3:ListBucketMultipartUploads"] == {bucket}
        expected |= {"s3:DeleteObject", "s3:ListBucketMultipartUploads"}
    if kms:
        assert granted["kms:Decrypt"] == {KMS_ARN}
        assert granted["kms:GenerateDataKey"] == {KMS_ARN}
        kms_stmt = next(s for s in policy["Statement"] if "kms:Decrypt" in s["Action"])
        assert kms_stmt["Condition"] == {"StringEquals": {"kms:ViaService": "s3.us-west-2.amazonaws.com"}}
        expected |= {"kms:Decrypt", "kms:GenerateDataKey"}
    assert set(granted) == expected
    for action, resources in granted.items():
        if action.startswith("s3:"):
            assert resources <= {bucket, fragments}, (action, resources)


@needs_terraform
def test_aws_policy_attachment_is_optional(aws_renderer: Renderer) -> None:
    policy = _resource(AWS, "aws_iam_policy", "inference")
    assert policy["policy"] == "${local.inference_policy_json}"
    attachment = _resource(AWS, "aws_iam_role_policy_attachment", "inference", raw=True)
    assert attachment["policy_arn"] == "${aws_iam_policy.inference.arn}"
    count = _expr(attachment["count"])
    assert aws_renderer.eval({"n": count}, AWS_VARS) == {"n": 0}
    with_role = {**AWS_VARS, "attach_to_role_name": "inference-nodes"}
    assert aws_renderer.eval({"n": count, "role": _expr(attachment["role"])}, with_role) == {
        "n": 1,
        "role": "inference-nodes",
    }


def test_aws_outputs() -> None:
    outputs = _blocks(AWS, "output")
    for name in (
        "url",
        "bucket_url",
        "region",
        "policy_arn",
        "vllm_kv_transfer_config",
    ):
        assert name in outputs, name
        assert outputs[name].get("description"), name
    assert outputs["policy_arn"]["value"] == "${aws_iam_policy.inference.arn}"
    assert outputs["bucket_url"]["value"] == "s3://${aws_s3_bucket.cache.id}/${var.prefix}"
    assert outputs["url"]["value"].startswith("s3://${aws_s3_bucket.cache.id}/${var.prefix}?region=")
    assert outputs["region"]["value"] == "${local.region}"


# ==========================================================================
# Tests: variable validation, evaluated by Terraform
# ==========================================================================


AWS_BAD = [
    ("ttl_days", 0),
    ("ttl_days", -3),
    ("ttl_days", 1.5),
    ("abort_incomplete_multipart_days", 0),
    ("bucket_name", "ab"),
    ("bucket_name", "Upper-Case"),
    ("bucket_name", "has.dots"),
    ("bucket_name", "-leading-hyphen"),
    ("bucket_name", "xn--reserved"),
    ("bucket_name", "x" * 64),
    ("prefix", ""),
    ("prefix", "/vua"),
    ("prefix", "vua/"),
    ("prefix", "a//b"),
    ("kms_key_arn", "alias/my-key"),
    ("iam_policy_path", "no-slashes"),
    ("refresh_after_hours", -1),
]


@needs_terraform
@pytest.mark.parametrize(("name", "value"), AWS_BAD)
def test_aws_validation_rejects(aws_renderer: Renderer, name: str, value: Any) -> None:
    with pytest.raises(ConsoleError, match="Invalid value for variable"):
        aws_renderer.eval({"p": "local.key_prefix"}, {**AWS_VARS, name: value})


VAST_BAD = [
    ("ttl_days", 0),
    ("bucket_name", "Bad_Name"),
    ("bucket_name", "a..b"),
    ("bucket_name", "192.168.0.1"),
    ("prefix", "/vua"),
    ("endpoint", "https://s3.vast.example.com"),
    ("endpoint", "s3.vast.example.com/path"),
    ("endpoint_scheme", "ftp"),
    ("ca_bundle", "relative/ca.pem"),
    ("view_path", "/trailing/"),
    ("service_user_uid", 0),
    ("refresh_after_hours", -1),
]


@needs_terraform
@pytest.mark.parametrize(("name", "value"), VAST_BAD)
def test_vast_validation_rejects(vast_renderer: Renderer, name: str, value: Any) -> None:
    with pytest.raises(ConsoleError, match="Invalid value for variable"):
        vast_renderer.eval({"p": "local.key_prefix"}, {**VAST_VARS, name: value})


@needs_terraform
def test_good_values_are_accepted(aws_renderer: Renderer, vast_renderer: Renderer) -> None:
    aws = aws_renderer.eval(
        {"p": "local.key_prefix", "n": "local.iam_policy_name"},
        {
            **AWS_VARS,
            "ttl_days": 30,
            "kms_key_arn": KMS_ARN,
            "iam_policy_path": "/vua/",
        },
    )
    assert aws == {"p": "kv/llama3/", "n": "vua-kv-cache-test-vua-s3"}
    vast = vast_renderer.eval(
        {"p": "local.view_path", "o": "local.bucket_owner"},
        {**VAST_VARS, "endpoint": "[fd00::5]:8443", "bucket_name": "kv.cache"},
    )
    assert vast == {"p": "/kv.cache", "o": "vua-s3"}


@needs_terraform
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_refresh_after_pairs_with_ttl_days(module: Path, aws_renderer: Renderer, vast_renderer: Renderer) -> None:
    """The readers' refresh_after comes from the module, an eighth of ttl_days unless set;
    more than a quarter fails the plan (the output's precondition)."""
    renderer, base = (aws_renderer, AWS_VARS) if module == AWS else (vast_renderer, VAST_VARS)
    names = {"s": "local.refresh_after_seconds", "ok": "local.refresh_pairing_ok", "o": "local.vua_options"}
    assert renderer.eval(names, base) == {"s": 75600, "ok": True, "o": {"refresh_after": 75600}}
    assert renderer.eval(names, {**base, "ttl_days": 30, "refresh_after_hours": 0}) == {"s": None, "ok": True, "o": {}}
    assert renderer.eval(names, {**base, "refresh_after_hours": 42})["ok"] is True
    assert renderer.eval(names, {**base, "refresh_after_hours": 43})["ok"] is False
    outputs = _blocks(module, "output")
    assert _one(outputs["refresh_after"]["precondition"])["condition"] == "${local.refresh_pairing_ok}"
    assert outputs["refresh_after"]["value"] == "${local.refresh_after_seconds}"
    assert outputs["vua_options"]["value"] == "${local.vua_options}"
    assert "local.vua_options" in str(outputs["vllm_kv_transfer_config"]["value"])


# ==========================================================================
# Tests: terraform/vast wiring
# ==========================================================================

# Argument names of the resources used, from the vastdata provider's v2.0
# documentation (docs/resources/*.md). A name outside these sets would be an
# invented attribute that `terraform validate` would reject.
VASTDATA_ARGUMENTS: dict[str, set[str]] = {
    "vastdata_view": {
        "path",
        "policy_id",
        "protocols",
        "bucket",
        "bucket_owner",
        "create_dir",
        "tenant_id",
        "allow_s3_anonymous_access",
        "s3_versioning",
        "name",
        "alias",
        "bucket_creators",
        "bucket_creators_groups",
        "create_dir_mode",
        "locking",
        "qos_policy_id",
        "s3_unverified_lookup",
        "delete_dir",
    },
    "vastdata_user": {
        "name",
        "uid",
        "gids",
        "leading_gid",
        "local_provider_id",
        "s3_policies_ids",
        "allow_create_bucket",
        "allow_delete_bucket",
        "s3_superuser",
        "local",
    },
    "vastdata_user_key": {
        "user_id",
        "username",
        "tenant_id",
        "enabled",
        "pgp_public_key",
    },
    "vastdata_s3_policy": {"name", "policy", "enabled", "tenant_id"},
    "vastdata_s3_life_cycle_rule": {
        "name",
        "view_id",
        "enabled",
        "prefix",
        "expiration_days",
        "expiration_date",
        "abort_mpu_days_after_initiation",
        "expired_obj_delete_marker",
        "max_size",
        "min_size",
        "newer_noncurrent_versions",
        "noncurrent_days",
        "object_age_attr",
    },
}
VASTDATA_DATA_ARGUMENTS = {
    "vastdata_tenant": {"name"},
    "vastdata_view_policy": {"name"},
}


def test_vast_uses_documented_attribute_names() -> None:
    resources = _blocks(VAST, "resource")
    assert set(resources) == set(VASTDATA_ARGUMENTS)
    for rtype, instances in resources.items():
        for name, body in instances.items():
            unknown = set(body) - VASTDATA_ARGUMENTS[rtype] - {"depends_on", "count", "lifecycle"}
            assert not unknown, f"{rtype}.{name}: {unknown}"
    for dtype, instances in _blocks(VAST, "data").items():
        for body in instances.values():
            assert set(body) <= VASTDATA_DATA_ARGUMENTS[dtype]


def test_vast_view_is_an_s3_bucket_with_owner() -> None:
    view = _resource(VAST, "vastdata_view", "cache")
    assert view["protocols"] == ["S3"]
    assert view["bucket"] == "${var.bucket_name}"
    assert view["bucket_owner"] == "${local.bucket_owner}"
    assert view["policy_id"] == "${data.vastdata_view_policy.s3.id}"
    assert view["allow_s3_anonymous_access"] is False
    assert "s3_versioning" not in view


def test_vast_service_user_and_key() -> None:
    user = _resource(VAST, "vastdata_user", "service")
    assert user["s3_policies_ids"] == ["${vastdata_s3_policy.cache.id}"]
    for flag in ("allow_create_bucket", "allow_delete_bucket", "s3_superuser"):
        assert user[flag] is False, flag
    key = _resource(VAST, "vastdata_user_key", "service")
    assert key["user_id"] == "${vastdata_user.service.id}"
    assert key["enabled"] is True
    outputs = _blocks(VAST, "output")
    assert outputs["secret_access_key"]["value"] == "${vastdata_user_key.service.secret_key}"
    assert outputs["secret_access_key"]["sensitive"] is True
    assert outputs["access_key_id"]["value"] == "${vastdata_user_key.service.access_key}"
    policy = _resource(VAST, "vastdata_s3_policy", "cache")
    assert policy["policy"] == "${local.s3_policy_json}"
    assert policy["enabled"] is True


@needs_terraform
def test_vast_lifecycle_uses_ttl_days_and_aborts_multipart(
    vast_renderer: Renderer,
) -> None:
    rules = _blocks(VAST, "resource")["vastdata_s3_life_cycle_rule"]
    for body in rules.values():
        assert body["view_id"] == "${tostring(vastdata_view.cache.id)}"
    assert rules["expire_fragments"]["expiration_days"] == "${var.ttl_days}"
    api = {r["ID"]: r for r in _vast_lifecycle_rules(vast_renderer, {"ttl_days": 21})}
    assert api["expire_fragments"] == {
        "ID": "expire_fragments",
        "Filter": {"Prefix": "vua/"},
        "Expiration": {"Days": 21},
        "Status": "Enabled",
    }
    assert api["abort_incomplete_uploads"] == {
        "ID": "abort_incomplete_uploads",
        "Filter": {},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        "Status": "Enabled",
    }


@needs_terraform
@pytest.mark.parametrize("maintenance", [False, True])
def test_vast_s3_policy_limited_to_bucket(vast_renderer: Renderer, maintenance: bool) -> None:
    policy = _vast_policy(vast_renderer, allow_maintenance=maintenance)
    bucket = "arn:aws:s3:::vua-kv-cache"
    allowed: dict[str, set[str]] = {}
    denied: set[str] = set()
    for stmt in policy["Statement"]:
        resources = set(_as_list(stmt["Resource"]))
        assert resources <= {bucket, f"{bucket}/vua/*"}, stmt
        actions = set(_as_list(stmt["Action"]))
        assert not any("*" in a for a in actions)
        if stmt["Effect"] == "Allow":
            for action in actions:
                allowed.setdefault(action, set()).update(resources)
        else:
            denied |= actions
    assert allowed["s3:GetObject"] == {f"{bucket}/vua/*"}
    assert allowed["s3:PutObject"] == {f"{bucket}/vua/*"}
    assert allowed["s3:ListBucket"] == {bucket}
    assert ("s3:DeleteObject" in allowed) is maintenance
    assert {
        "s3:DeleteBucket",
        "s3:PutBucketPolicy",
        "s3:PutLifecycleConfiguration",
    } <= denied


@needs_terraform
def test_vast_url_and_settings(vast_renderer: Renderer) -> None:
    exprs = {
        "url": "local.vua_s3_url",
        "settings": "local.vua_s3_settings",
        "ep": "local.endpoint_url",
    }
    got = vast_renderer.eval(exprs, VAST_VARS)
    assert got["url"] == (
        "s3://vua-kv-cache/vua?endpoint_url=https://s3.vast.example.com"
        "&addressing=path&checksum=when_required&region=us-east-1"
    )
    assert got["ep"] == "https://s3.vast.example.com"
    assert got["settings"]["addressing"] == "path"
    assert got["settings"]["checksum"] == "when_required"
    lab = vast_renderer.eval(
        exprs,
        {
            **VAST_VARS,
            "tls_verify": False,
            "ca_bundle": "/etc/ssl/vast-ca.pem",
            "endpoint": "vip1:8443",
        },
    )
    assert lab["url"].endswith("&region=us-east-1&verify=false&ca_bundle=/etc/ssl/vast-ca.pem")
    assert lab["ep"] == "https://vip1:8443"
    outputs = _blocks(VAST, "output")
    for name in (
        "url",
        "bucket_url",
        "endpoint_url",
        "vua_s3_settings",
        "vllm_kv_transfer_config",
    ):
        assert name in outputs, name
        assert outputs[name].get("description"), name
    assert outputs["url"]["value"] == "${local.vua_s3_url}"


# ==========================================================================
# Tests: an S3 implementation (moto, real HTTP on 127.0.0.1) accepts them
# ==========================================================================


def _without_principal(policy: dict[str, Any]) -> dict[str, Any]:
    """Bucket-policy statements in identity-policy form, so moto's IAM policy
    validator can check their grammar (moto's S3 stores bucket policies as-is)."""
    return {
        **policy,
        "Statement": [{k: v for k, v in s.items() if k != "Principal"} for s in policy["Statement"]],
    }


@needs_terraform
def test_moto_accepts_aws_lifecycle_and_policies(aws_renderer: Renderer, moto_endpoint: str) -> None:
    s3 = _client("s3", moto_endpoint)
    iam = _client("iam", moto_endpoint)
    bucket = AWS_VARS["bucket_name"]
    s3.create_bucket(Bucket=bucket)

    rules = _aws_lifecycle_rules(aws_renderer, {"ttl_days": 9})
    for rule in rules:  # moto accepts some invalid values; S3 does not
        assert rule["Status"] in ("Enabled", "Disabled")
        for action in (
            "Expiration",
            "AbortIncompleteMultipartUpload",
            "NoncurrentVersionExpiration",
        ):
            for days in rule.get(action, {}).values():
                assert isinstance(days, int), days
                assert days >= 1, days
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    stored = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert {r["ID"]: r for r in stored} == {r["ID"]: r for r in rules}

    for maintenance, kms in ((False, None), (True, KMS_ARN)):
        bucket_policy, inference = _aws_documents(aws_renderer, allow_maintenance=maintenance, kms_key_arn=kms)
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(bucket_policy))
        assert json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"]) == bucket_policy
        assert s3.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"] is False
        suffix = f"{int(maintenance)}{int(kms is not None)}"
        iam.create_policy(
            PolicyName=f"bucket-grammar-{suffix}",
            PolicyDocument=json.dumps(_without_principal(bucket_policy)),
        )
        created = iam.create_policy(PolicyName=f"vua-s3-{suffix}", PolicyDocument=json.dumps(inference))
        assert created["Policy"]["Arn"].endswith(f":policy/vua-s3-{suffix}")


@needs_terraform
def test_moto_accepts_vast_lifecycle_and_policy(vast_renderer: Renderer, moto_endpoint: str) -> None:
    s3 = _client("s3", moto_endpoint)
    iam = _client("iam", moto_endpoint)
    bucket = VAST_VARS["bucket_name"]
    s3.create_bucket(Bucket=bucket)
    rules = _vast_lifecycle_rules(vast_renderer, {})
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    assert len(s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]) == 2
    for maintenance in (False, True):
        policy = _vast_policy(vast_renderer, allow_maintenance=maintenance)
        iam.create_policy(
            PolicyName=f"vast-vua-s3-{int(maintenance)}",
            PolicyDocument=json.dumps(policy),
        )


def test_moto_policy_validator_is_live(moto_endpoint: str) -> None:
    """Negative control: the IAM validator the tests above rely on does reject
    a malformed statement, so their passing means something."""
    iam = _client("iam", moto_endpoint)
    bad = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "GetObject", "Resource": "arn:aws:s3:::b/*"}],
    }
    with pytest.raises(iam.exceptions.MalformedPolicyDocumentException):
        iam.create_policy(PolicyName="negative-control", PolicyDocument=json.dumps(bad))


# ==========================================================================
# Tests: scanners and formatting
# ==========================================================================


def _checkov() -> str | None:
    return os.environ.get("CHECKOV_BIN") or shutil.which("checkov")


def test_checkov_is_clean(tmp_path: Path) -> None:
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not found: set CHECKOV_BIN or put checkov on PATH (pip install checkov)")
    env = {
        **os.environ,
        "BC_SKIP_MAPPING": "TRUE",
        "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
    }
    proc = subprocess.run(
        [
            checkov,
            "--directory",
            str(TF_ROOT),
            "--framework",
            "terraform",
            "--output",
            "json",
            "--skip-download",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = reports[0]["summary"]
    results = reports[0]["results"]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results.get("failed_checks", [])]
    assert not failed, failed
    assert summary["failed"] == 0
    assert summary["parsing_errors"] == 0
    passed = {c["check_id"] for c in results["passed_checks"]}
    # public access block (x4, and its existence), encryption at rest, abort of
    # failed uploads, lifecycle present, no Allow for any principal, ACLs off,
    # no admin or "*" actions in the IAM policy
    must_pass = {
        *("CKV_AWS_53", "CKV_AWS_54", "CKV_AWS_55", "CKV_AWS_56", "CKV2_AWS_6"),
        *("CKV_AWS_19", "CKV_AWS_300", "CKV2_AWS_61", "CKV_AWS_70", "CKV2_AWS_65"),
        *("CKV_AWS_62", "CKV_AWS_63"),
    }
    assert must_pass <= passed, must_pass - passed
    for skipped in results.get("skipped_checks", []):
        reason = skipped.get("check_result", {}).get("suppress_comment", "")
        assert len(reason.strip()) > 20, f"{skipped['check_id']} skipped without a reason"


@needs_terraform
def test_terraform_fmt_is_clean(tmp_path: Path) -> None:
    terraform = _terraform()
    assert terraform is not None
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": str(tmp_path / "none.tfrc"),
    }
    (tmp_path / "none.tfrc").write_text("")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-diff", "-recursive", str(TF_ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
