"""Shared code of the pg_tde `command` key provider adapters (protocol v1).

pg_tde runs an adapter without a shell, writes ONE JSON request on its stdin and
closes it, and reads ONE JSON reply from its stdout (see README.md):

    request  {"version": 1, "operation": "wrap" | "unwrap" | "verify",
              "key_id": "<KMS key id>", "data": "<standard base64>"}
    reply    {"status": "ok", "data": "<base64>", "key_version": "<optional>"}
             {"status": "denied" | "unavailable", "message": "..."}

This module reads and checks the request, runs the adapter's handler, and writes
the reply; the adapter exits 0 whenever it could write a reply.  It never writes
anything else to stdout, nothing to stderr, and never puts key bytes in a
message: every message is scrubbed of the request's data in its usual
encodings before it is sent.

Each adapter is a script in this directory that imports this module (Python puts
the script's own directory, symlinks resolved, first on sys.path); install both.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import subprocess
import sys
from typing import Callable, Iterable

PROTOCOL_VERSION = 1
OPERATIONS = ("wrap", "unwrap", "verify")
MAX_REQUEST_BYTES = 1 << 20
MAX_DATA_BYTES = 64 * 1024
MAX_WRAP_BYTES = 4096
MAX_MESSAGE_CHARS = 1000
DEFAULT_CLI_TIMEOUT = 25.0

# A KMS key id is an ARN or alias (AWS), a key URL or name (Azure), a resource
# name (GCP) or a key name (Transit).  It is passed to CLIs as an argument, so
# it may not start with "-" (an option) or "@" (az reads "@file" arguments from
# files), and holds no whitespace or control characters.
KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=,~%-]{0,2047}")


class AdapterError(Exception):
    """A failure the adapter reports as a reply (never a crash)."""

    status = "unavailable"


class Denied(AdapterError):
    """The KMS answered and refused: key disabled, revoked, deleted, pending
    deletion, expired, permission denied, ciphertext refused."""

    status = "denied"


class Unavailable(AdapterError):
    """The KMS cannot be reached or the adapter failed otherwise (network,
    throttling, 5xx, CLI missing, bad request or arguments)."""

    status = "unavailable"


class Request:
    def __init__(self, operation: str, key_id: str, data: bytes):
        self.operation = operation
        self.key_id = key_id
        self.data = data

    def __repr__(self) -> str:  # never the data
        return f"Request({self.operation!r}, {self.key_id!r}, <{len(self.data)} bytes>)"


# ---------------------------------------------------------------------------
# scrubbing


class Scrubber:
    """Removes secret bytes, in the encodings a tool might print them in, from
    text that leaves the adapter."""

    def __init__(self) -> None:
        self._needles: list[str] = []

    def add(self, secret: bytes | str | None) -> None:
        if not secret:
            return
        if isinstance(secret, str):
            self._add_text(secret)
            return
        b64 = base64.b64encode(secret).decode()
        self._add_text(b64)
        self._add_text(b64.rstrip("="))
        url = base64.urlsafe_b64encode(secret).decode()
        self._add_text(url)
        self._add_text(url.rstrip("="))
        self._add_text(secret.hex())
        self._add_text(secret.hex().upper())
        try:
            text = secret.decode("ascii")
            if text.isprintable():
                self._add_text(text)
        except UnicodeDecodeError:
            pass

    def _add_text(self, s: str) -> None:
        if len(s) >= 6 and s not in self._needles:
            self._needles.append(s)
            self._needles.sort(key=len, reverse=True)

    def clean(self, text: str) -> str:
        for n in self._needles:
            text = text.replace(n, "[redacted]")
        return text


SCRUBBER = Scrubber()


def tidy(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One line of printable text, scrubbed, at most `limit` characters."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # ANSI colours
    text = "".join(c if c.isprintable() else " " for c in text)
    text = re.sub(r"\s+", " ", text).strip()
    text = SCRUBBER.clean(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# ---------------------------------------------------------------------------
# request and reply


def b64decode_strict(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise Unavailable(f"invalid request: {what} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise Unavailable(f"invalid request: {what} is not valid standard base64") from None


def check_key_id(key_id, what: str = "key_id") -> str:
    if not isinstance(key_id, str) or not key_id:
        raise Unavailable(f"invalid request: {what} must be a non-empty string")
    if not KEY_ID_RE.fullmatch(key_id):
        raise Unavailable(
            f"invalid request: {what} must start with a letter or digit and hold only "
            "letters, digits and . _ : / + = , ~ % - (at most 2048 characters)"
        )
    return key_id


def parse_request(raw: bytes) -> Request:
    if len(raw) > MAX_REQUEST_BYTES:
        raise Unavailable("invalid request: larger than 1 MiB")
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Unavailable("invalid request: stdin is not one JSON object") from None
    if not isinstance(req, dict):
        raise Unavailable("invalid request: stdin is not one JSON object")
    # The data is a secret in a wrap request (and a ciphertext otherwise):
    # scrub it from every message before anything else can fail.
    if isinstance(req.get("data"), str):
        SCRUBBER.add(req["data"])
    version = req.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Unavailable(f"invalid request: unsupported protocol version {version!r} (this adapter speaks 1)")
    op = req.get("operation")
    if op not in OPERATIONS:
        shown = op if isinstance(op, str) and len(op) < 40 else type(op).__name__
        raise Unavailable(f"invalid request: unknown operation {shown!r} (wrap, unwrap or verify)")
    key_id = check_key_id(req.get("key_id"))
    data = b64decode_strict(req.get("data"), "data")
    SCRUBBER.add(data)
    if not data:
        raise Unavailable("invalid request: data is empty")
    if op == "wrap" and len(data) > MAX_WRAP_BYTES:
        raise Unavailable(f"invalid request: a key to wrap is at most {MAX_WRAP_BYTES} bytes")
    if len(data) > MAX_DATA_BYTES:
        raise Unavailable("invalid request: data is larger than 64 KiB")
    return Request(op, key_id, data)


def write_reply(reply: dict) -> None:
    out = json.dumps(reply, separators=(",", ":"), sort_keys=True) + "\n"
    sys.stdout.write(out)
    sys.stdout.flush()


def ok_reply(data: bytes | None = None, key_version: str | None = None) -> dict:
    r: dict = {"status": "ok"}
    if data is not None:
        r["data"] = base64.b64encode(data).decode("ascii")
    if key_version:
        r["key_version"] = str(key_version)
    return r


# ---------------------------------------------------------------------------
# arguments


class ArgParser(argparse.ArgumentParser):
    """Argument errors become an "unavailable" reply instead of exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise Unavailable(f"invalid adapter arguments (provider option \"args\"): {message}")


def add_cli_arguments(p: argparse.ArgumentParser, cli: str) -> None:
    p.add_argument("--cli", default=cli, metavar="PATH",
                   help=f"the {cli} executable (default: `{cli}` on the server's PATH)")
    p.add_argument("--cli-timeout", type=float, default=DEFAULT_CLI_TIMEOUT, metavar="SECONDS",
                   help="kill the CLI after this long (default %(default)s; keep it below the provider's timeout)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set an environment variable for the CLI (paths and settings only, never secrets)")


def cli_env(opts, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(extra or {})
    for item in opts.env:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise Unavailable(f"invalid adapter arguments: --env wants NAME=VALUE, got {tidy(item, 80)!r}")
        env[name] = value
    return env


# ---------------------------------------------------------------------------
# running a CLI


class CliResult:
    def __init__(self, returncode: int, stdout: bytes, stderr: str):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def run_cli(argv: list[str], *, stdin: bytes, timeout: float, env: dict, name: str) -> CliResult:
    """Run a CLI without a shell; the secret goes to its stdin, never its argv."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, close_fds=True,
            # Same process group as the adapter: when pg_tde kills the
            # adapter's group at its timeout, the CLI goes too.
        )
    except FileNotFoundError:
        raise Unavailable(f"the {name} CLI was not found ({argv[0]!r}): install it or pass --cli /path/to/{name}") from None
    except PermissionError:
        raise Unavailable(f"the {name} CLI ({argv[0]!r}) is not executable") from None
    except OSError as e:
        raise Unavailable(f"the {name} CLI could not be started: {e.strerror}") from None
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise Unavailable(f"the {name} CLI did not answer within {timeout:g} s") from None
    except BaseException:
        _kill(proc)
        raise
    return CliResult(proc.returncode, out, err.decode("utf-8", "replace"))


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


BOILERPLATE_RE = re.compile(
    r"^(If you would like to report this issue|gcloud feedback$|To check gcloud for common problems|"
    r"gcloud info --run-diagnostics$)"
)


def summarize_stderr(text: str) -> str:
    """A CLI's error output without the frames of a Python traceback (the
    exception line stays) nor gcloud's "report this issue" boilerplate."""
    kept: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            continue
        if in_traceback and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        in_traceback = False
        if line.strip() and not BOILERPLATE_RE.match(line.strip()):
            kept.append(line)
    return "\n".join(kept)


def cli_failure(name: str, res: CliResult, denied: Callable[[str], bool]) -> AdapterError:
    """The error for a CLI that exited non-zero: "denied" when its stderr shows
    the KMS refused, "unavailable" otherwise."""
    text = tidy(summarize_stderr(res.stderr), 800) or "(no error output)"
    msg = f"{name} exited with status {res.returncode}: {text}"
    return Denied(msg) if denied(res.stderr) else Unavailable(msg)


def parse_json_output(name: str, res: CliResult) -> dict:
    try:
        v = json.loads(res.stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Unavailable(f"{name} printed something that is not JSON") from None
    if not isinstance(v, dict):
        raise Unavailable(f"{name} printed JSON that is not an object")
    return v


def field_b64(name: str, obj: dict, field: str, urlsafe: bool = False) -> bytes:
    v = obj.get(field)
    if not isinstance(v, str) or not v:
        raise Unavailable(f"{name}'s reply has no {field!r}")
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise Unavailable(f"{name}'s {field!r} is not base64") from None


# ---------------------------------------------------------------------------
# main


Handler = Callable[[Request, argparse.Namespace], dict]


def main(parser: argparse.ArgumentParser, handler: Handler, argv: Iterable[str] | None = None) -> int:
    """Read the request, run `handler`, write the reply; returns the exit status."""
    # Arguments first, so that `--help` answers without waiting for stdin.
    opts = None
    args_error: AdapterError | None = None
    try:
        opts = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except AdapterError as e:
        args_error = e
    # Always read the whole request, so that pg_tde's write never fails.
    try:
        raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    except OSError:
        raw = b""
    try:
        try:
            try:
                req = parse_request(raw)
            except AdapterError:
                if args_error is None:
                    raise
            if args_error is not None:  # reported first: it fails every request
                raise args_error
            reply = handler(req, opts)
        except AdapterError as e:
            reply = {"status": e.status, "message": tidy(str(e))}
        except Exception as e:  # a bug: report it without a traceback or any data
            reply = {"status": "unavailable", "message": f"adapter internal error ({type(e).__name__})"}
        write_reply(reply)
    except BrokenPipeError:
        # pg_tde went away; nothing to report to.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
    return 0
