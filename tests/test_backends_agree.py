"""The backends against each other, from the same neutral weights (the ``parity`` session).

Each backend runs tests/parity.py in its own process (Keras reads KERAS_BACKEND once), and
every check is compared across all pairs. Runs when XFER_PARITY=1 (nox -s parity).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import parity

pytestmark = pytest.mark.skipif(
    os.environ.get("XFER_PARITY") != "1", reason="cross-backend parity runs in `nox -s parity`"
)
KIT_IDS = ("torch", "keras-jax", "keras-torch", "flax")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for kit_id in KIT_IDS:
        path = tmp_path_factory.mktemp("parity") / f"{kit_id}.npz"
        script = os.path.join(os.path.dirname(__file__), "parity.py")
        subprocess.run([sys.executable, script, kit_id, str(path)], check=True)
        out[kit_id] = dict(np.load(path))
    return out


def test_every_check_agrees_across_all_backends(results):
    worst: dict[str, tuple[float, str]] = {}
    failures = []
    for a, b in itertools.combinations(KIT_IDS, 2):
        assert set(results[a]) == set(results[b])
        for key in results[a]:
            diff = float(np.max(np.abs(results[a][key] - results[b][key])))
            group = parity.check_group(key)
            if diff > worst.get(group, (-1.0, ""))[0]:
                worst[group] = (diff, f"{a} vs {b}: {key}")
            if diff > parity.tolerance(key):
                failures.append(f"{a} vs {b}: {key} differs by {diff:.2e}")
    print("\nlargest difference per check across all backend pairs:")
    for group, (diff, where) in worst.items():
        print(f"  {group:<16} {diff:.2e}  ({where})")
    assert not failures, "\n".join(failures[:20])
