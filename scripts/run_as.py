"""Running commands and owning files as the unprivileged OS user of the clusters.

initdb and postgres refuse to run as root, so when the caller is root (as on CI)
the test and benchmark clusters run as PG_TDE_OS_USER (default `postgres`, the
user scripts/common.sh creates).  Shared by scripts/bench_db.py and
tests/integration/cluster.py.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

OS_USER = os.environ.get("PG_TDE_OS_USER", "postgres")


def as_user(cmd: list[str]) -> list[str]:
    """`cmd`, run as OS_USER when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", OS_USER, "--"] + cmd
    return cmd


def chown(path: Path) -> None:
    """Give `path` to OS_USER when we are root."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam(OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
