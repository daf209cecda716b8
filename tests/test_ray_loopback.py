"""A local Ray cluster (`precompute --ray-address local`, the demo, `cache verify --ray-address local`)
listens on 127.0.0.1 only, also in a process whose environment does not say so beforehand (as
tests/conftest.py does for the tests in this process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import json

import ray

from geovr.pipeline.precompute import connect_ray

connect_ray("local", cpus=1)
context = ray.get_runtime_context()
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "gcs": context.gcs_address}))
ray.shutdown()
"""


def test_a_local_cluster_started_after_ray_was_imported_stays_on_loopback():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["node_ip"] == "127.0.0.1" and found["gcs"].startswith("127.0.0.1:"), found
