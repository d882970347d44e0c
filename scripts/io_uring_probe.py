#!/usr/bin/env python3
"""Whether this kernel lets an unprivileged PostgreSQL server use io_uring.

Containers often forbid io_uring_setup, and kernel.io_uring_disabled = 1 allows
it to privileged processes only, which the server is not.  Used by
scripts/test.sh (run as a program: prints the reason and exits 1 when refused)
and by tests/integration/test_aio.py (imported: `refusal()`).
"""

from __future__ import annotations

import ctypes
import os
import sys


def refusal() -> str | None:
    """Why io_uring is refused to the server, or None when it is allowed."""
    try:
        disabled = int(open("/proc/sys/kernel/io_uring_disabled").read())
    except (OSError, ValueError):
        disabled = 0
    if disabled:
        return f"kernel.io_uring_disabled = {disabled}"
    libc = ctypes.CDLL(None, use_errno=True)
    params = (ctypes.c_ubyte * 120)()
    fd = libc.syscall(425, 4, params)  # io_uring_setup(4, &params) on x86-64
    if fd < 0:
        return os.strerror(ctypes.get_errno())
    os.close(fd)
    return None


if __name__ == "__main__":
    why = refusal()
    if why:
        print(why)
        sys.exit(1)
