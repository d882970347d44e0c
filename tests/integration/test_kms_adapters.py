"""The `command` key provider's adapters in contrib/kms-adapters (protocol v1).

AWS KMS, Azure Key Vault and Google Cloud KMS: these are CONTRACT tests.  The
clouds cannot be reached from here, so a stand-in `aws`, `az` or `gcloud`
executable, put first on PATH, plays the CLI: it checks the exact arguments the
adapter gives it (and fails loudly, exit 2 with a message on stderr, on
anything else), checks that the key is in none of its arguments nor its
environment, reads the key or ciphertext the way the real CLI does (a
`fileb://` path, `@-` or `-`: stdin), "encrypts" reversibly (a header naming the
key, then XOR with a pad derived from the key), and prints the real CLI's reply
shape (AWS: {"CiphertextBlob", "KeyId", "EncryptionAlgorithm"}; az: {"kid",
"result", ...}; gcloud: the raw ciphertext or plaintext on stdout, since the
adapter passes `-` as file names).  KMS_STANDIN_MODE switches it to the real
CLIs' error output (a disabled key, a permission denied, a network failure,
throttling...) and KMS_STANDIN_LOG is where it logs its arguments.  The error
texts are those of the real CLIs, checked against aws-cli 1.45 and gcloud 528
talking to a fake local endpoint; the az texts follow the az CLI's error format
(`(Code) message` / `Code: ...`).

OpenBao / Vault Transit: the adapter talks to a real OpenBao dev server over
TLS (keyservers.py): round trips, key rotation, a token without the decrypt
capability, min_decryption_version, a sealed and a stopped server, a CA that
did not sign the server's certificate, namespaces.

Every case checks the protocol's invariants: exit status 0, exactly one JSON
reply on stdout, nothing on stderr, and the key bytes nowhere but in the
"data" of an unwrap reply.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyservers import OpenBao, openbao

ADAPTERS = Path(__file__).resolve().parents[2] / "contrib" / "kms-adapters"

# ---------------------------------------------------------------------------
# the stand-in CLIs

STANDIN = r'''
import base64, hashlib, json, os, sys, time

TOOL = os.path.basename(sys.argv[0])
ARGV = sys.argv[1:]
MODE = os.environ.get("KMS_STANDIN_MODE", "ok")
AZ_VERSION = os.environ.get("KMS_STANDIN_AZ_VERSION", "0123456789abcdef0123456789abcdef")

if os.environ.get("KMS_STANDIN_LOG"):
    with open(os.environ["KMS_STANDIN_LOG"], "a") as f:
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "AZURE_", "CLOUDSDK_"))}
        f.write(json.dumps({"tool": TOOL, "argv": ARGV, "env": env}) + "\n")


def fail(msg):
    sys.stderr.write("STAND-IN %s: %s\nargv: %r\n" % (TOOL, msg, ARGV))
    sys.exit(2)


def options(args, flags=()):
    """--name value pairs (and the given value-less flags); no repeats."""
    opts, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            fail("unexpected positional argument %r" % a)
        if a in flags:
            opts[a] = True
            i += 1
            continue
        if "=" in a:
            fail("the stand-in expects '--option value', not %r" % a)
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            fail("option %s has no value" % a)
        if a in opts:
            fail("option %s given twice" % a)
        opts[a] = args[i + 1]
        i += 2
    return opts


def check_names(opts, required, optional=()):
    missing = set(required) - set(opts)
    extra = set(opts) - set(required) - set(optional)
    if missing or extra:
        fail("missing %s, unexpected %s" % (sorted(missing), sorted(extra)))


def no_secret_outside(secret):
    forms = {base64.b64encode(secret).decode(), base64.b64encode(secret).decode().rstrip("="),
             base64.urlsafe_b64encode(secret).decode().rstrip("="), secret.hex(), secret.hex().upper()}
    places = [("argv", a) for a in ARGV] + [("environment", v) for v in os.environ.values()]
    for where, text in places:
        for form in forms:
            if form in text:
                fail("the key is in my %s" % where)
        if secret.decode("latin-1") in text:
            fail("the key is in my %s" % where)


def pad(ref, n):
    return hashlib.shake_256(b"pad|" + ref.encode()).digest(n)


def seal(ref, pt):
    return b"STANDIN1" + hashlib.sha256(ref.encode()).digest()[:8] + bytes(a ^ b for a, b in zip(pt, pad(ref, len(pt))))


def unseal(ref, ct):
    """None when the ciphertext is not one of `ref`."""
    if ct[:8] != b"STANDIN1" or ct[8:16] != hashlib.sha256(ref.encode()).digest()[:8]:
        return None
    body = ct[16:]
    return bytes(a ^ b for a, b in zip(body, pad(ref, len(body))))


def read_stdin():
    return sys.stdin.buffer.read()


def error(text, code):
    sys.stderr.write(text)
    sys.exit(code)


def common_modes(op):
    if MODE == "crash":
        error("Traceback (most recent call last):\n  File \"cli.py\", line 1\nRuntimeError: boom\n", 1)
    if MODE == "garbage":  # exit 0 without a usable answer
        if TOOL != "gcloud":  # gcloud prints raw bytes: it prints nothing
            sys.stdout.write("this is not what the CLI prints\n")
        sys.exit(0)
    if MODE == "slow":
        time.sleep(60)


# -- aws --------------------------------------------------------------------

def aws():
    if ARGV[:2] not in (["kms", "encrypt"], ["kms", "decrypt"]):
        fail("not 'aws kms encrypt|decrypt'")
    op = ARGV[1]
    opts = options(ARGV[2:])
    blob_opt = "--plaintext" if op == "encrypt" else "--ciphertext-blob"
    check_names(opts, ["--key-id", blob_opt, "--output"], ["--region", "--profile", "--endpoint-url"])
    if opts["--output"] != "json":
        fail("--output is not json")
    if not opts[blob_opt].startswith("fileb://"):
        fail("%s is not a fileb:// path" % blob_opt)
    path = opts[blob_opt][len("fileb://"):]
    with open(path, "rb") as f:
        data = f.read()
    key = opts["--key-id"]
    region = opts.get("--region", "eu-west-1")
    arn = key if key.startswith("arn:") else "arn:aws:kms:%s:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab" % region
    operation = "Encrypt" if op == "encrypt" else "Decrypt"
    common_modes(op)
    if MODE == "disabled":
        error("\nAn error occurred (DisabledException) when calling the %s operation: %s is disabled.\n" % (operation, arn), 254)
    if MODE == "pending_deletion":
        error("\nAn error occurred (KMSInvalidStateException) when calling the %s operation: %s is pending deletion.\n" % (operation, arn), 254)
    if MODE == "access_denied":
        error("\nAn error occurred (AccessDeniedException) when calling the %s operation: User: "
              "arn:aws:sts::111122223333:assumed-role/pg/i-0abc is not authorized to perform: kms:%s on resource: %s "
              "because no identity-based policy allows the kms:%s action\n" % (operation, operation, arn, operation), 254)
    if MODE == "network":
        error("\nCould not connect to the endpoint URL: \"https://kms.%s.amazonaws.com/\"\n" % region, 255)
    if MODE == "throttled":
        error("\nAn error occurred (ThrottlingException) when calling the %s operation (reached max retries: 2): "
              "Rate exceeded\n" % operation, 254)
    if op == "encrypt":
        no_secret_outside(data)
        print(json.dumps({"CiphertextBlob": base64.b64encode(seal(key, data)).decode(), "KeyId": arn,
                          "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, indent=4))
        return
    pt = unseal(key, data)
    if pt is None:
        if data[:8] == b"STANDIN1":
            error("\nAn error occurred (IncorrectKeyException) when calling the Decrypt operation: The key ID in "
                  "the request does not identify a CMK that can perform this operation.\n", 254)
        error("\nAn error occurred (InvalidCiphertextException) when calling the Decrypt operation: \n", 254)
    no_secret_outside(pt)
    print(json.dumps({"KeyId": arn, "Plaintext": base64.b64encode(pt).decode(),
                      "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, indent=4))


# -- az ---------------------------------------------------------------------

def az_value(v):
    """az's own expansion of an '@file' argument ('@-': stdin), trailing newline dropped."""
    if v.startswith("@"):
        if v == "@-":
            text = sys.stdin.read()
        else:
            with open(v[1:]) as f:
                text = f.read()
        return text.rstrip("\n")
    return v


def az():
    if ARGV[:3] not in (["keyvault", "key", "encrypt"], ["keyvault", "key", "decrypt"]):
        fail("not 'az keyvault key encrypt|decrypt'")
    op = ARGV[2]
    opts = options(ARGV[3:], flags=("--only-show-errors",))
    base = ["--algorithm", "--data-type", "--value", "--output", "--only-show-errors"]
    if "--id" in opts:
        check_names(opts, base + ["--id"])
        url = opts["--id"]
        parts = url.split("/")
        if not url.startswith("https://") or len(parts) not in (5, 6) or parts[3] != "keys":
            fail("--id is not a key URL")
        vault, name = "/".join(parts[:3]), parts[4]
        version = parts[5] if len(parts) == 6 else None
    elif "--vault-name" in opts:
        check_names(opts, base + ["--vault-name", "--name"])
        vault, name, version = "https://%s.vault.azure.net" % opts["--vault-name"], opts["--name"], None
    elif "--hsm-name" in opts:
        check_names(opts, base + ["--hsm-name", "--name"])
        vault, name, version = "https://%s.managedhsm.azure.net" % opts["--hsm-name"], opts["--name"], None
    else:
        fail("neither --id nor --vault-name/--hsm-name")
    if opts["--algorithm"] not in ("RSA-OAEP-256", "RSA-OAEP"):
        fail("unexpected --algorithm")
    if opts["--data-type"] != "base64" or opts["--output"] != "json":
        fail("--data-type base64 and --output json expected")
    if opts["--value"] != "@-":
        fail("--value is not '@-' (the value must come from stdin)")
    value = base64.b64decode(az_value(opts["--value"]), validate=True)
    common_modes(op)
    verb = "encrypt" if op == "encrypt" else "decrypt"
    if MODE == "disabled":
        error("ERROR: (Forbidden) Operation %s is not allowed on a disabled key.\nCode: Forbidden\n"
              "Message: Operation %s is not allowed on a disabled key.\nInner error: {\n    \"code\": \"KeyDisabled\"\n}\n"
              % (verb, verb), 1)
    if MODE == "pending_deletion":
        error("ERROR: (KeyNotFound) A key with (name/id) %s was not found in this key vault. If you recently "
              "deleted this key you may be able to recover it using the correct recovery command.\n"
              "Code: KeyNotFound\n" % name, 1)
    if MODE == "access_denied":
        error("ERROR: (Forbidden) The user, group or application 'appid=0;oid=1;iss=https://sts.windows.net/2/' "
              "does not have keys %s permission on key vault 'vault;location=westeurope'.\nCode: Forbidden\n"
              "Inner error: {\n    \"code\": \"AccessDenied\"\n}\n" % verb, 1)
    if MODE == "network":
        host = vault[len("https://"):]
        error("ERROR: HTTPSConnectionPool(host='%s', port=443): Max retries exceeded with url: /keys/%s/?api-version=7.4 "
              "(Caused by NameResolutionError(\"<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to resolve "
              "'%s' ([Errno -3] Temporary failure in name resolution)\"))\n" % (host, name, host), 1)
    if MODE == "throttled":
        error("ERROR: (Throttled) Request was not processed because too many requests were received.\n"
              "Code: Throttled\n", 1)
    kid = "%s/keys/%s/%s" % (vault, name, version or AZ_VERSION)
    ref = "%s/keys/%s/%s" % (vault.lower(), name.lower(), version or AZ_VERSION)
    if op == "encrypt":
        no_secret_outside(value)
        print(json.dumps({"aad": None, "algorithm": opts["--algorithm"], "iv": None, "kid": kid,
                          "result": base64.b64encode(seal(ref, value)).decode(), "tag": None}, indent=2))
        return
    if version is None:
        fail("decrypt without a key version: the adapter must use the kid that encrypted")
    pt = unseal(ref, value)
    if pt is None:
        error("ERROR: (BadParameter) The parameter is incorrect.\nCode: BadParameter\n", 1)
    no_secret_outside(pt)
    print(json.dumps({"algorithm": opts["--algorithm"], "kid": kid, "result": base64.b64encode(pt).decode()}, indent=2))


# -- gcloud -----------------------------------------------------------------

def gcloud():
    if ARGV[:2] not in (["kms", "encrypt"], ["kms", "decrypt"]):
        fail("not 'gcloud kms encrypt|decrypt'")
    op = ARGV[1]
    opts = options(ARGV[2:], flags=("--quiet",))
    check_names(opts, ["--key", "--plaintext-file", "--ciphertext-file"],
                ["--keyring", "--location", "--project", "--impersonate-service-account", "--access-token-file", "--quiet"])
    key = opts["--key"]
    if key.startswith("projects/"):
        if "--keyring" in opts or "--location" in opts:
            fail("--keyring/--location with a resource name")
        resource = key
    else:
        if "--keyring" not in opts or "--location" not in opts:
            fail("a key name without --keyring and --location")
        resource = "projects/%s/locations/%s/keyRings/%s/cryptoKeys/%s" % (
            opts.get("--project", "standin-project"), opts["--location"], opts["--keyring"], key)
    src, dst = ("--plaintext-file", "--ciphertext-file") if op == "encrypt" else ("--ciphertext-file", "--plaintext-file")
    if opts[src] != "-" or opts[dst] != "-":
        fail("%s and %s must be '-' (stdin / stdout)" % (src, dst))
    data = read_stdin()
    common_modes(op)
    if MODE == "disabled":
        error("ERROR: (gcloud.kms.%s) FAILED_PRECONDITION: %s/cryptoKeyVersions/1 is not enabled, current state is: "
              "DISABLED.\n" % (op, resource), 1)
    if MODE == "pending_deletion":
        error("ERROR: (gcloud.kms.%s) FAILED_PRECONDITION: %s/cryptoKeyVersions/1 is not enabled, current state is: "
              "DESTROY_SCHEDULED.\n" % (op, resource), 1)
    if MODE == "access_denied":
        error("ERROR: (gcloud.kms.%s) PERMISSION_DENIED: Permission 'cloudkms.cryptoKeyVersions.useTo%s' denied on "
              "resource '%s' (or it may not exist).\n" % (op, op.capitalize(), resource), 1)
    if MODE == "network":
        error("ERROR: gcloud crashed (ConnectionError): HTTPSConnectionPool(host='cloudkms.googleapis.com', port=443): "
              "Max retries exceeded with url: /v1/%s:%s?alt=json (Caused by NewConnectionError('<urllib3.connection."
              "HTTPSConnection object at 0x7f>: Failed to establish a new connection: [Errno 101] Network is "
              "unreachable'))\n\nIf you would like to report this issue, please run the following command:\n"
              "  gcloud feedback\n" % (resource, op), 1)
    if MODE == "throttled":
        error("ERROR: (gcloud.kms.%s) RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'Cryptographic requests' "
              "and limit 'Cryptographic requests per minute'.\n" % op, 1)
    if op == "encrypt":
        no_secret_outside(data)
        sys.stdout.buffer.write(seal(resource, data))
        return
    pt = unseal(resource, data)
    if pt is None:
        error("ERROR: (gcloud.kms.decrypt) INVALID_ARGUMENT: Decryption failed: the ciphertext is invalid.\n", 1)
    no_secret_outside(pt)
    sys.stdout.buffer.write(pt)


{"aws": aws, "az": az, "gcloud": gcloud}[TOOL]()
'''
DISPATCH = '{"aws": aws, "az": az, "gcloud": gcloud}[TOOL]()'
assert STANDIN.count(DISPATCH) == 1


@pytest.fixture(scope="module")
def standin_bin(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("standin-bin")
    for tool in ("aws", "az", "gcloud"):
        p = d / tool
        p.write_text(f"#!{sys.executable}\n" + STANDIN)
        p.chmod(0o755)
    return d


# ---------------------------------------------------------------------------
# running an adapter


@dataclass
class Reply:
    status: str
    reply: dict
    stdout: bytes
    stderr: bytes
    argv: list = field(default_factory=list)  # the stand-in's calls: [(tool, argv)]
    envs: list = field(default_factory=list)  # the CLI-related environment of each call

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.reply["data"])


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
            and not k.startswith(("KMS_STANDIN_", "AWS_", "AZURE_", "CLOUDSDK_", "VAULT_", "BAO_"))}


def run_adapter(adapter: str, request, args=(), *, env: dict | None = None, timeout: float = 120) -> Reply:
    """Run an adapter as pg_tde does (no shell, request on stdin, stdin closed)
    and check the protocol's invariants."""
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    env = dict(env if env is not None else clean_env())
    log = Path(env["KMS_STANDIN_LOG"]) if env.get("KMS_STANDIN_LOG") else None
    before = log.read_text().splitlines() if log and log.exists() else []
    r = subprocess.run([str(ADAPTERS / adapter), *args], input=raw, capture_output=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{adapter} exited {r.returncode}: {r.stderr!r}"
    assert r.stderr == b"", f"{adapter} wrote to stderr: {r.stderr!r}"
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1, f"{adapter} did not print exactly one line: {r.stdout!r}"
    reply = json.loads(lines[0])
    assert isinstance(reply, dict) and reply.get("status") in ("ok", "denied", "unavailable"), reply
    if reply["status"] != "ok":
        assert isinstance(reply.get("message"), str) and reply["message"], reply
        assert "Traceback" not in reply["message"], reply
        assert set(reply) == {"status", "message"}, reply
    after = log.read_text().splitlines() if log and log.exists() else []
    calls = [json.loads(x) for x in after[len(before):]]
    return Reply(reply["status"], reply, r.stdout, r.stderr, [(c["tool"], c["argv"]) for c in calls],
                 [c["env"] for c in calls])


def request(op: str, key_id: str, data: bytes) -> dict:
    return {"version": 1, "operation": op, "key_id": key_id, "data": base64.b64encode(data).decode()}


def secret_forms(key: bytes) -> list[bytes]:
    b64 = base64.b64encode(key)
    return [key, b64, b64.rstrip(b"="), base64.urlsafe_b64encode(key).rstrip(b"="), key.hex().encode(),
            key.hex().upper().encode()]


def assert_no_secret(key: bytes, *blobs) -> None:
    for blob in blobs:
        b = blob if isinstance(blob, bytes) else json.dumps(blob).encode()
        for form in secret_forms(key):
            assert form not in b, f"the key appears in {b[:200]!r}"


# ---------------------------------------------------------------------------
# the clouds


@dataclass
class Cloud:
    name: str
    adapter: str
    tool: str
    key_id: str
    args: list
    other_key_id: str

    def wrap_argv(self, key_id=None) -> list:
        k = key_id or self.key_id
        if self.tool == "aws":
            return ["kms", "encrypt", "--key-id", k, "--plaintext", "fileb:///dev/stdin", "--output", "json",
                    "--region", "eu-west-1", "--profile", "pgtde"]
        if self.tool == "az":
            return ["keyvault", "key", "encrypt", "--id", k, "--algorithm", "RSA-OAEP-256", "--data-type", "base64",
                    "--value", "@-", "--output", "json", "--only-show-errors"]
        return ["kms", "encrypt", "--key", k, "--plaintext-file", "-", "--ciphertext-file", "-", "--quiet"]

    def unwrap_argv(self, key_id=None) -> list:
        k = key_id or self.key_id
        if self.tool == "aws":
            return ["kms", "decrypt", "--ciphertext-blob", "fileb:///dev/stdin", "--key-id", k, "--output", "json",
                    "--region", "eu-west-1", "--profile", "pgtde"]
        if self.tool == "az":
            return ["keyvault", "key", "decrypt", "--id", f"{k}/{AZ_VERSION}", "--algorithm", "RSA-OAEP-256",
                    "--data-type", "base64", "--value", "@-", "--output", "json", "--only-show-errors"]
        return ["kms", "decrypt", "--key", k, "--ciphertext-file", "-", "--plaintext-file", "-", "--quiet"]


AZ_VERSION = "0123456789abcdef0123456789abcdef"
CLOUDS = {
    "aws": Cloud("aws", "pg_tde_kms_aws", "aws",
                 "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                 ["--region", "eu-west-1", "--profile", "pgtde"],
                 "arn:aws:kms:eu-west-1:111122223333:key/0000abcd-12ab-34cd-56ef-1234567890ab"),
    "azure": Cloud("azure", "pg_tde_kms_azure", "az", "https://pgtde-vault.vault.azure.net/keys/pgtde-kek", [],
                   "https://pgtde-vault.vault.azure.net/keys/other-kek"),
    "gcp": Cloud("gcp", "pg_tde_kms_gcp", "gcloud",
                 "projects/pgtde-project/locations/europe-west1/keyRings/pgtde/cryptoKeys/kek", [],
                 "projects/pgtde-project/locations/europe-west1/keyRings/pgtde/cryptoKeys/other"),
}


@pytest.fixture(params=sorted(CLOUDS))
def cloud(request) -> Cloud:
    return CLOUDS[request.param]


@pytest.fixture
def cenv(standin_bin, tmp_path):
    """The adapter's environment: the stand-ins first on PATH, a log of their calls."""
    env = clean_env()
    env["PATH"] = f"{standin_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["KMS_STANDIN_LOG"] = str(tmp_path / "standin.log")
    return env


def with_mode(env: dict, mode: str) -> dict:
    e = dict(env)
    e["KMS_STANDIN_MODE"] = mode
    return e


def wrap_ok(cloud: Cloud, env: dict, key: bytes) -> Reply:
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, key), cloud.args, env=env)
    assert r.status == "ok", r.reply
    return r


# ---------------------------------------------------------------------------
# contract tests: aws, az, gcloud


def test_adapters_are_executable_python_scripts():
    for name in ("pg_tde_kms_aws", "pg_tde_kms_azure", "pg_tde_kms_gcp", "pg_tde_kms_openbao"):
        p = ADAPTERS / name
        assert p.read_text().startswith("#!/usr/bin/env python3\n"), name
        assert p.stat().st_mode & stat.S_IXOTH, f"{name} is not executable"
    assert (ADAPTERS / "_pg_tde_kms.py").is_file()
    assert (ADAPTERS / "README.md").is_file()


@pytest.mark.parametrize("size", [16, 32])
def test_round_trip_and_verify(cloud, cenv, size):
    key = os.urandom(size)
    w = wrap_ok(cloud, cenv, key)
    assert w.argv == [(cloud.tool, cloud.wrap_argv())]
    assert w.data and key not in w.data
    if cloud.name == "azure":
        assert w.reply["key_version"] == AZ_VERSION
    else:
        assert set(w.reply) == {"status", "data"}

    u = run_adapter(cloud.adapter, request("unwrap", cloud.key_id, w.data), cloud.args, env=cenv)
    assert u.status == "ok", u.reply
    assert u.data == key
    assert u.argv == [(cloud.tool, cloud.unwrap_argv())]

    v = run_adapter(cloud.adapter, request("verify", cloud.key_id, w.data), cloud.args, env=cenv)
    assert v.reply == {"status": "ok"}
    assert v.argv == [(cloud.tool, cloud.unwrap_argv())]
    assert_no_secret(key, w.stdout, v.stdout)


def test_key_is_never_on_a_command_line_nor_in_a_message(cloud, cenv):
    """The stand-ins refuse to run with the key in their argv or environment;
    here, the logged argv, the replies and the adapter's stderr are checked too."""
    key = os.urandom(32)
    w = wrap_ok(cloud, cenv, key)
    u = run_adapter(cloud.adapter, request("unwrap", cloud.key_id, w.data), cloud.args, env=cenv)
    v = run_adapter(cloud.adapter, request("verify", cloud.key_id, w.data), cloud.args, env=cenv)
    failures = [run_adapter(cloud.adapter, request(op, cloud.key_id, data), cloud.args, env=with_mode(cenv, mode))
                for op, data in (("wrap", key), ("unwrap", w.data))
                for mode in ("disabled", "network", "crash")]
    for r in [w, u, v] + failures:
        assert r.stderr == b""
        assert_no_secret(key, json.dumps(r.argv).encode())
        for tool, argv in r.argv:
            assert tool == cloud.tool
    assert_no_secret(key, w.stdout, v.stdout, *[r.stdout for r in failures])
    assert u.data == key


@pytest.mark.parametrize("mode", ["disabled", "pending_deletion", "access_denied"])
@pytest.mark.parametrize("op", ["wrap", "unwrap", "verify"])
def test_refusals_are_denied(cloud, cenv, mode, op):
    key = os.urandom(32)
    data = key if op == "wrap" else wrap_ok(cloud, cenv, key).data
    r = run_adapter(cloud.adapter, request(op, cloud.key_id, data), cloud.args, env=with_mode(cenv, mode))
    assert r.status == "denied", r.reply
    assert f"{cloud.tool} exited" in r.reply["message"], r.reply
    assert_no_secret(key, r.stdout)


@pytest.mark.parametrize("mode", ["network", "throttled", "crash", "garbage"])
@pytest.mark.parametrize("op", ["wrap", "unwrap", "verify"])
def test_outages_are_unavailable(cloud, cenv, mode, op):
    key = os.urandom(32)
    data = key if op == "wrap" else wrap_ok(cloud, cenv, key).data
    r = run_adapter(cloud.adapter, request(op, cloud.key_id, data), cloud.args, env=with_mode(cenv, mode))
    assert r.status == "unavailable", r.reply
    if mode == "network":
        assert any(s in r.reply["message"] for s in ("Could not connect", "Max retries exceeded")), r.reply
    if mode == "crash":
        assert "boom" in r.reply["message"]  # the CLI's stderr, one line, no traceback header
    assert_no_secret(key, r.stdout)


def test_a_hung_cli_is_killed(cloud, cenv):
    start = time.monotonic()
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)),
                    cloud.args + ["--cli-timeout", "2"], env=with_mode(cenv, "slow"))
    assert r.status == "unavailable" and "did not answer within 2 s" in r.reply["message"], r.reply
    assert time.monotonic() - start < 30


def test_a_missing_cli_is_unavailable(cloud, cenv, tmp_path):
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)),
                    cloud.args + ["--cli", str(tmp_path / "no-such-cli")], env=cenv)
    assert r.status == "unavailable" and "was not found" in r.reply["message"], r.reply
    bare = tmp_path / "bin"  # python3 only: no CLI on PATH at all
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    env = dict(cenv)
    env["PATH"] = str(bare)
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)), cloud.args, env=env)
    assert r.status == "unavailable" and "was not found" in r.reply["message"], r.reply


def test_a_ciphertext_of_another_key_is_refused(cloud, cenv):
    w = wrap_ok(cloud, cenv, os.urandom(32))
    r = run_adapter(cloud.adapter, request("unwrap", cloud.other_key_id, w.data), cloud.args, env=cenv)
    if cloud.name == "azure":
        # The wrapped data names its key: the adapter refuses before calling az.
        assert r.status == "unavailable" and "belongs to" in r.reply["message"], r.reply
        assert r.argv == []
    else:
        # IncorrectKeyException (AWS) / INVALID_ARGUMENT: Decryption failed (GCP).
        assert r.status == "denied", r.reply


BAD_REQUESTS = {
    "empty": b"",
    "not json": b"wrap this please",
    "not an object": b"[1, 2]",
    "no version": json.dumps({"operation": "wrap", "key_id": "k", "data": "QUJD"}).encode(),
    "version 2": json.dumps({"version": 2, "operation": "wrap", "key_id": "k", "data": "QUJD"}).encode(),
    "version as text": json.dumps({"version": "1", "operation": "wrap", "key_id": "k", "data": "QUJD"}).encode(),
    "unknown operation": json.dumps({"version": 1, "operation": "encrypt", "key_id": "k", "data": "QUJD"}).encode(),
    "no key_id": json.dumps({"version": 1, "operation": "wrap", "data": "QUJD"}).encode(),
    "key_id an option": json.dumps({"version": 1, "operation": "wrap", "key_id": "--endpoint-url=http://x",
                                    "data": "QUJD"}).encode(),
    "key_id a file": json.dumps({"version": 1, "operation": "wrap", "key_id": "@/etc/passwd", "data": "QUJD"}).encode(),
    "key_id with a newline": json.dumps({"version": 1, "operation": "wrap", "key_id": "a\nb", "data": "QUJD"}).encode(),
    "bad base64": json.dumps({"version": 1, "operation": "wrap", "key_id": "k", "data": "not base64!"}).encode(),
    "url-safe base64": json.dumps({"version": 1, "operation": "wrap", "key_id": "k", "data": "-_-_"}).encode(),
    "empty data": json.dumps({"version": 1, "operation": "wrap", "key_id": "k", "data": ""}).encode(),
    "data not a string": json.dumps({"version": 1, "operation": "wrap", "key_id": "k", "data": 5}).encode(),
}


@pytest.mark.parametrize("what", sorted(BAD_REQUESTS))
def test_malformed_requests_get_an_error_reply(cloud, cenv, what):
    r = run_adapter(cloud.adapter, BAD_REQUESTS[what], cloud.args, env=cenv)
    assert r.status == "unavailable", r.reply
    assert r.reply["message"].startswith("invalid request"), r.reply
    assert r.argv == [], "the CLI ran for a malformed request"


def test_malformed_request_messages_never_show_the_data(cloud, cenv):
    key = os.urandom(32)
    req = request("wrap", cloud.key_id, key)
    req["version"] = 7
    r = run_adapter(cloud.adapter, req, cloud.args, env=cenv)
    assert r.status == "unavailable" and "version" in r.reply["message"]
    assert_no_secret(key, r.stdout)


def test_bad_adapter_arguments_get_an_error_reply(cloud, cenv):
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)), ["--no-such-option"], env=cenv)
    assert r.status == "unavailable", r.reply
    assert r.reply["message"].startswith("invalid adapter arguments"), r.reply
    assert r.argv == []


@pytest.mark.parametrize("tool,argv", [
    ("aws", ["kms", "encrypt", "--key-id", "k", "--plaintext", "fileb:///dev/null"]),  # no --output json
    ("aws", ["kms", "encrypt", "--key-id", "k", "--plaintext", "AAAA", "--output", "json"]),  # not fileb://
    ("aws", ["kms", "re-encrypt", "--key-id", "k"]),
    ("az", ["keyvault", "key", "encrypt", "--id", "https://v.vault.azure.net/keys/k", "--algorithm", "RSA-OAEP-256",
            "--data-type", "base64", "--value", "QUJDREVGR0g=", "--output", "json", "--only-show-errors"]),  # on argv
    ("az", ["keyvault", "key", "wrap-key", "--id", "https://v.vault.azure.net/keys/k"]),
    ("gcloud", ["kms", "encrypt", "--key", "k", "--plaintext-file", "-", "--ciphertext-file", "-"]),  # no keyring
    ("gcloud", ["kms", "decrypt", "--key", "projects/p/locations/l/keyRings/r/cryptoKeys/k",
                "--ciphertext-file", "/tmp/ct", "--plaintext-file", "/tmp/pt"]),  # files, not stdin/stdout
])
def test_standins_fail_loudly_on_unexpected_arguments(standin_bin, tool, argv):
    """The contract checker itself: an argument shape the adapters do not use is an error."""
    r = subprocess.run([str(standin_bin / tool), *argv], input=b"", capture_output=True, env=clean_env(), timeout=60)
    assert r.returncode == 2 and b"STAND-IN" in r.stderr, r
    assert r.stdout == b""


def test_standin_refuses_a_key_on_its_command_line(standin_bin, tmp_path):
    key = os.urandom(32)
    (tmp_path / "pt").write_bytes(key)
    argv = ["kms", "encrypt", "--key-id", "k", "--plaintext", f"fileb://{tmp_path / 'pt'}", "--output", "json",
            "--region", base64.b64encode(key).decode()]
    r = subprocess.run([str(standin_bin / "aws"), *argv], capture_output=True, env=clean_env(), timeout=60)
    assert r.returncode == 2 and b"the key is in my argv" in r.stderr, r


def test_standin_complaints_reach_pg_tde_as_unavailable(cloud, cenv, standin_bin, tmp_path):
    """A stand-in that rejects the adapter's call makes the adapter answer
    unavailable with the stand-in's complaint in the message."""
    extra = {"aws": ["--endpoint-url", "https://kms.example"], "azure": ["--algorithm", "RSA-OAEP"],
             "gcp": ["--project", "p"]}[cloud.name]
    strict = tmp_path / cloud.tool  # a stand-in that also refuses the argument extra[1]
    strict.write_text((standin_bin / cloud.tool).read_text().replace(
        DISPATCH, f"if {extra[1]!r} in ARGV:\n    fail('unexpected {extra[1]}')\n" + DISPATCH))
    strict.chmod(0o755)
    req = request("wrap", cloud.key_id, os.urandom(32))
    r = run_adapter(cloud.adapter, req, cloud.args + ["--cli", str(strict)], env=cenv)
    assert r.status == "ok", r.reply
    r = run_adapter(cloud.adapter, req, cloud.args + extra + ["--cli", str(strict)], env=cenv)
    assert r.status == "unavailable" and f"STAND-IN {cloud.tool}: unexpected {extra[1]}" in r.reply["message"], r.reply


def test_cli_environment(cloud, cenv):
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)),
                    cloud.args + ["--env", "AWS_CONFIG_FILE=/etc/pg_tde/aws.conf",
                                  "--env", "CLOUDSDK_CONFIG=/etc/pg_tde/gcloud"], env=cenv)
    assert r.status == "ok", r.reply
    env = r.envs[0]
    assert env["AWS_CONFIG_FILE"] == "/etc/pg_tde/aws.conf" and env["CLOUDSDK_CONFIG"] == "/etc/pg_tde/gcloud"
    if cloud.tool == "aws":
        assert env["AWS_PAGER"] == ""
    if cloud.tool == "gcloud":
        assert env["CLOUDSDK_CORE_DISABLE_PROMPTS"] == "1"
    if cloud.tool == "az":
        assert env["AZURE_CORE_COLLECT_TELEMETRY"] == "false"
    r = run_adapter(cloud.adapter, request("wrap", cloud.key_id, os.urandom(32)), cloud.args + ["--env", "no-equals"],
                    env=cenv)
    assert r.status == "unavailable" and "--env" in r.reply["message"] and r.argv == [], r.reply


def test_aws_options(cenv):
    c = CLOUDS["aws"]
    key = os.urandom(32)
    r = run_adapter(c.adapter, request("wrap", "alias/pg_tde", key), ["--endpoint-url", "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com"], env=cenv)
    assert r.status == "ok", r.reply
    assert r.argv == [("aws", ["kms", "encrypt", "--key-id", "alias/pg_tde", "--plaintext", "fileb:///dev/stdin",
                               "--output", "json", "--endpoint-url", "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com"])]
    u = run_adapter(c.adapter, request("unwrap", "alias/pg_tde", r.data), [], env=cenv)
    assert u.status == "ok" and u.data == key
    assert u.argv == [("aws", ["kms", "decrypt", "--ciphertext-blob", "fileb:///dev/stdin", "--key-id", "alias/pg_tde",
                               "--output", "json"])]


def test_azure_key_name_vault_hsm_and_rotation(cenv):
    c = CLOUDS["azure"]
    key = os.urandom(32)
    r = run_adapter(c.adapter, request("wrap", "pgtde-kek", key), ["--vault-name", "pgtde-vault"], env=cenv)
    assert r.status == "ok" and r.reply["key_version"] == AZ_VERSION, r.reply
    assert r.argv[0][1][:7] == ["keyvault", "key", "encrypt", "--vault-name", "pgtde-vault", "--name", "pgtde-kek"]
    blob = json.loads(r.data)
    assert blob["kid"] == f"https://pgtde-vault.vault.azure.net/keys/pgtde-kek/{AZ_VERSION}"
    assert blob["alg"] == "RSA-OAEP-256"

    # The key is rotated: wrap uses (and reports) the new version, the old
    # wrapped key is still decrypted with the version that encrypted it.
    rotated = dict(cenv, KMS_STANDIN_AZ_VERSION="fedcba9876543210fedcba9876543210")
    r2 = run_adapter(c.adapter, request("wrap", "pgtde-kek", key), ["--vault-name", "pgtde-vault"], env=rotated)
    assert r2.reply["key_version"] == "fedcba9876543210fedcba9876543210"
    for wrapped in (r, r2):
        u = run_adapter(c.adapter, request("unwrap", "pgtde-kek", wrapped.data), ["--vault-name", "pgtde-vault"],
                        env=rotated)
        assert u.status == "ok" and u.data == key, u.reply
        assert u.argv[0][1][3:5] == ["--id", json.loads(wrapped.data)["kid"]]
    # The key URL form unwraps what the key-name form wrapped.
    u = run_adapter(c.adapter, request("unwrap", c.key_id, r.data), [], env=cenv)
    assert u.status == "ok" and u.data == key, u.reply

    h = run_adapter(c.adapter, request("wrap", "hsm-kek", key), ["--hsm-name", "pgtde-hsm", "--algorithm", "RSA-OAEP"],
                    env=cenv)
    assert h.status == "ok", h.reply
    assert h.argv[0][1][3:9] == ["--hsm-name", "pgtde-hsm", "--name", "hsm-kek", "--algorithm", "RSA-OAEP"]
    u = run_adapter(c.adapter, request("unwrap", "hsm-kek", h.data), ["--hsm-name", "pgtde-hsm"], env=cenv)
    assert u.status == "ok" and u.data == key, u.reply

    # A key name needs a vault; garbage is not a wrapped key.
    r = run_adapter(c.adapter, request("wrap", "pgtde-kek", key), [], env=cenv)
    assert r.status == "unavailable" and "--vault-name" in r.reply["message"] and r.argv == []
    r = run_adapter(c.adapter, request("unwrap", c.key_id, b"garbage"), [], env=cenv)
    assert r.status == "unavailable" and "not a key wrapped by" in r.reply["message"] and r.argv == []


def test_gcp_key_name_with_keyring_and_location(cenv):
    c = CLOUDS["gcp"]
    key = os.urandom(32)
    args = ["--project", "pgtde-project", "--location", "europe-west1", "--keyring", "pgtde",
            "--impersonate-service-account", "pg-tde@pgtde-project.iam.gserviceaccount.com"]
    r = run_adapter(c.adapter, request("wrap", "kek", key), args, env=cenv)
    assert r.status == "ok", r.reply
    assert r.argv == [("gcloud", ["kms", "encrypt", "--key", "kek", "--keyring", "pgtde", "--location", "europe-west1",
                                  "--plaintext-file", "-", "--ciphertext-file", "-", "--project", "pgtde-project",
                                  "--impersonate-service-account", "pg-tde@pgtde-project.iam.gserviceaccount.com",
                                  "--quiet"])]
    # The same key by its resource name.
    u = run_adapter(c.adapter, request("unwrap", c.key_id, r.data), [], env=cenv)
    assert u.status == "ok" and u.data == key, u.reply
    r = run_adapter(c.adapter, request("wrap", "kek", key), [], env=cenv)
    assert r.status == "unavailable" and "--keyring" in r.reply["message"] and r.argv == []
    r = run_adapter(c.adapter, request("wrap", "projects/p/keyRings/r", key), [], env=cenv)
    assert r.status == "unavailable" and r.reply["message"].startswith("invalid request") and r.argv == []


# ---------------------------------------------------------------------------
# OpenBao / Vault Transit, against a real server

KEY = "pgtde-kek"


@pytest.fixture(scope="module")
def bao():
    with openbao() as server:
        server.ok("POST", "sys/mounts/transit", {"type": "transit"})
        server.ok("POST", f"transit/keys/{KEY}", {"type": "aes256-gcm96", "exportable": False})
        yield server


def bao_args(server: OpenBao, token_file=None, ca=None, *extra) -> list:
    return ["--url", server.url, "--token-file", str(token_file or server.token_file),
            "--ca-file", str(ca or server.ca), *extra]


def make_token(server: OpenBao, name: str, policy: str) -> Path:
    server.ok("PUT", f"sys/policies/acl/{name}", {"policy": policy})
    token = server.ok("POST", "auth/token/create", {"policies": [name], "no_default_policy": True})["auth"]["client_token"]
    return server.file(f"token-{name}", token + "\n")


def test_openbao_round_trip_and_rotation(bao):
    key = os.urandom(32)
    w = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(bao))
    assert w.status == "ok", w.reply
    assert w.data.startswith(b"vault:v") and w.reply["key_version"] == w.data.split(b":")[1][1:].decode()
    v1 = w.reply["key_version"]
    u = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, w.data), bao_args(bao))
    assert u.status == "ok" and u.data == key, u.reply
    v = run_adapter("pg_tde_kms_openbao", request("verify", KEY, w.data), bao_args(bao))
    assert v.reply == {"status": "ok", "key_version": v1}  # root may read the key: its latest version
    assert_no_secret(key, w.stdout, v.stdout)

    bao.ok("POST", f"transit/keys/{KEY}/rotate", {})
    new = str(int(v1) + 1)
    w2 = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(bao))
    assert w2.status == "ok" and w2.reply["key_version"] == new and w2.data.startswith(f"vault:v{new}:".encode())
    for wrapped in (w, w2):  # the old ciphertext still decrypts
        u = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, wrapped.data), bao_args(bao))
        assert u.status == "ok" and u.data == key, u.reply
    v = run_adapter("pg_tde_kms_openbao", request("verify", KEY, w.data), bao_args(bao))
    assert v.reply == {"status": "ok", "key_version": new}


def test_openbao_token_without_decrypt_is_denied(bao):
    key = os.urandom(16)
    tf = make_token(bao, "pgtde-encrypt-only", 'path "transit/encrypt/*" { capabilities = ["update"] }')
    w = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(bao, tf))
    assert w.status == "ok", w.reply
    for op in ("unwrap", "verify"):
        r = run_adapter("pg_tde_kms_openbao", request(op, KEY, w.data), bao_args(bao, tf))
        assert r.status == "denied" and "permission denied" in r.reply["message"], r.reply
    # "update" only: a missing key is refused, not created.
    r = run_adapter("pg_tde_kms_openbao", request("wrap", "no-such-key", key), bao_args(bao, tf))
    assert r.status == "denied", r.reply
    status, _ = bao.api("GET", "transit/keys/no-such-key")
    assert status == 404

    # Least privilege: encrypt + decrypt of one key.  verify works, without the
    # key's latest version (the token may not read the key).
    tf = make_token(bao, "pgtde-kek", f'path "transit/encrypt/{KEY}" {{ capabilities = ["update"] }}\n'
                                      f'path "transit/decrypt/{KEY}" {{ capabilities = ["update"] }}\n')
    v = run_adapter("pg_tde_kms_openbao", request("verify", KEY, w.data), bao_args(bao, tf))
    assert v.reply == {"status": "ok"}
    # The token is revoked: denied.
    token = tf.read_text().strip()
    bao.ok("POST", "auth/token/revoke", {"token": token})
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, w.data), bao_args(bao, tf))
    assert r.status == "denied", r.reply
    assert token.encode() not in r.stdout


def test_openbao_refused_keys_and_ciphertexts_are_denied(bao):
    key = os.urandom(32)
    bao.ok("POST", "transit/keys/pgtde-old", {"type": "aes256-gcm96"})
    w1 = run_adapter("pg_tde_kms_openbao", request("wrap", "pgtde-old", key), bao_args(bao))
    bao.ok("POST", "transit/keys/pgtde-old/rotate", {})
    bao.ok("POST", "transit/keys/pgtde-old/config", {"min_decryption_version": 2})
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", "pgtde-old", w1.data), bao_args(bao))
    assert r.status == "denied" and "too old" in r.reply["message"], r.reply

    w = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(bao))
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", "no-such-key", w.data), bao_args(bao))
    assert r.status == "denied" and "not found" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", "pgtde-old", w.data), bao_args(bao))
    assert r.status == "denied", r.reply  # another key's ciphertext: message authentication failed
    r = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(bao, None, None, "--mount", "no-such-mount"))
    assert r.status == "denied" and "404" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, b"not a ciphertext"), bao_args(bao))
    assert r.status == "unavailable" and r.reply["message"].startswith("invalid request"), r.reply


def test_openbao_wrong_ca_is_unavailable(bao):
    r = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, os.urandom(32)), bao_args(bao, None, bao.unrelated_ca()))
    assert r.status == "unavailable" and "TLS" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, os.urandom(32)),
                    ["--url", bao.url, "--token-file", str(bao.token_file)])  # the system's CAs
    assert r.status == "unavailable" and "TLS" in r.reply["message"], r.reply


def test_openbao_namespace(bao):
    bao.create_namespace("pgtde-ns")
    bao.ok("POST", "sys/mounts/kms", {"type": "transit"}, namespace="pgtde-ns")
    bao.ok("POST", f"kms/keys/{KEY}", {"type": "aes256-gcm96"}, namespace="pgtde-ns")
    key = os.urandom(32)
    args = bao_args(bao, None, None, "--namespace", "pgtde-ns", "--mount", "kms")
    w = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), args)
    assert w.status == "ok" and w.reply["key_version"] == "1", w.reply
    u = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, w.data), args)
    assert u.status == "ok" and u.data == key
    # The root namespace's key of the same name cannot decrypt it.
    r = run_adapter("pg_tde_kms_openbao", request("unwrap", KEY, w.data), bao_args(bao))
    assert r.status == "denied", r.reply


def test_openbao_bad_arguments_and_token_file(bao, tmp_path):
    req = request("wrap", KEY, os.urandom(32))
    r = run_adapter("pg_tde_kms_openbao", req, ["--url", "http://bao.example.com:8200", "--token-file", str(bao.token_file)])
    assert r.status == "unavailable" and "https" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", req, bao_args(bao, tmp_path / "missing-token"))
    assert r.status == "unavailable" and "token file" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", req, bao_args(bao, None, None, "--mount", "../sys"))
    assert r.status == "unavailable" and "--mount" in r.reply["message"], r.reply
    r = run_adapter("pg_tde_kms_openbao", request("wrap", "a/../../sys/seal", os.urandom(32)), bao_args(bao))
    assert r.status == "unavailable" and r.reply["message"].startswith("invalid request"), r.reply
    r = run_adapter("pg_tde_kms_openbao", req, ["--token-file", str(bao.token_file)])
    assert r.status == "unavailable" and "--url" in r.reply["message"], r.reply
    for what, raw in BAD_REQUESTS.items():
        r = run_adapter("pg_tde_kms_openbao", raw, bao_args(bao))
        assert r.status == "unavailable" and r.reply["message"].startswith("invalid request"), (what, r.reply)


def test_openbao_sealed_and_stopped_server_are_unavailable():
    with openbao() as server:
        server.ok("POST", "sys/mounts/transit", {"type": "transit"})
        server.ok("POST", f"transit/keys/{KEY}", {"type": "aes256-gcm96"})
        key = os.urandom(32)
        w = run_adapter("pg_tde_kms_openbao", request("wrap", KEY, key), bao_args(server))
        assert w.status == "ok", w.reply
        server.ok("PUT", "sys/seal", {})
        for op, data in (("wrap", key), ("unwrap", w.data), ("verify", w.data)):
            r = run_adapter("pg_tde_kms_openbao", request(op, KEY, data), bao_args(server))
            assert r.status == "unavailable" and "sealed" in r.reply["message"], r.reply
        server.stop()
        for op, data in (("wrap", key), ("unwrap", w.data), ("verify", w.data)):
            r = run_adapter("pg_tde_kms_openbao", request(op, KEY, data), bao_args(server))
            assert r.status == "unavailable" and "cannot reach" in r.reply["message"], r.reply
            assert_no_secret(key, r.stdout)
