import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster, make_keyring_dir, setup_encryption  # noqa: E402

if not os.environ.get("PG_PREFIX"):
    raise RuntimeError("PG_PREFIX is not set: run the tests through scripts/test.sh")


@pytest.fixture
def keyring():
    return make_keyring_dir()


@pytest.fixture
def cluster(request):
    c = Cluster(request.node.name[:40].replace("[", "-").replace("]", ""))
    c.initdb()
    c.start()
    yield c
    c.destroy()


@pytest.fixture
def tde(cluster, keyring):
    """A running cluster whose postgres database has pg_tde and a principal key."""
    setup_encryption(cluster, keyring)
    return cluster


@pytest.fixture
def clusters():
    """A list the test appends the clusters it makes to; all are destroyed
    after the test, the last made first."""
    made: list[Cluster] = []
    yield made
    for c in reversed(made):
        c.destroy()
