"""Security hardening (issue 15): what reaches clients, what key
administrators can reach, what stays in memory.

Each test failed before its fix.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cluster import BIN, Cluster, as_user


@pytest.fixture
def backtrace_env_cluster():
    """A server started from an environment set up for Rust development
    (RUST_BACKTRACE=full), as a DBA's shell may be."""
    c = Cluster("rust-env")
    c.initdb()
    env = dict(os.environ, RUST_BACKTRACE="full")
    r = subprocess.run(
        as_user([str(BIN / "pg_ctl"), "-D", str(c.datadir), "-l", str(c.logfile), "-w", "-t", "120", "start"]),
        env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, c.log_tail()
    yield c
    c.destroy()


def _error_output(c: Cluster, query: str) -> str:
    r = subprocess.run(c.psql_args() + ["-v", "VERBOSITY=verbose"], input=query, capture_output=True, text=True)
    assert r.returncode != 0 or "ERROR" in r.stderr, r
    return r.stderr


def _no_rust(out: str) -> None:
    """No Rust backtrace or source path, beyond the LOCATION line that every
    error carries in verbose mode."""
    text = "\n".join(line for line in out.splitlines() if not line.startswith("LOCATION:"))
    for sign in ("backtrace", ".rs:", "pgrx", "rust_begin_unwind", "   0: "):
        assert sign not in text, f"{sign!r} in what the client got:\n{out}"


def test_errors_reach_clients_as_postgresql_raised_them(backtrace_env_cluster):
    c = backtrace_env_cluster
    c.sql("CREATE EXTENSION pg_tde")
    # an error that has nothing to do with pg_tde, through pg_tde's utility hook
    out = _error_output(c, "CREATE DATABASE postgres")
    assert "42P04" in out and 'database "postgres" already exists' in out, out
    assert "DETAIL" not in out, out
    _no_rust(out)
    # with every field PostgreSQL gives it (constraint, table, schema)
    c.sql("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
    out = _error_output(c, "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 5)")
    assert "23514" in out, out
    for field in ("SCHEMA NAME:  public", "TABLE NAME:  t", "CONSTRAINT NAME:  c"):
        assert field in out, f"{field!r} missing:\n{out}"
    _no_rust(out)
    # an error of pg_tde's own
    out = _error_output(c, "SELECT pg_tde_set_key_using_database_key_provider('k', 'no-such-provider')")
    _no_rust(out)
