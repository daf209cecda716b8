"""Start one Ray worker node on this host, on loopback, and block until SIGTERM.

`ray start --address=...` refuses to add a worker node when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and
without that variable Ray rewrites 127.0.0.1 to the host's external address. To run a multi-node
cluster on one host entirely on loopback (tests, single-machine dry runs of the Slurm job) this starts
the node the way Ray's own `ray.cluster_utils.Cluster.add_node` does. Real clusters use `ray start`.

Usage: python ray_local_worker.py HEAD_ADDRESS --num-cpus N [--num-gpus G]
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import ray._private.node
import ray._private.parameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="GCS address of the head, host:port")
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--num-gpus", type=int, default=0)
    args = parser.parse_args()
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        parser.error("set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so that the node stays on 127.0.0.1")

    params = ray._private.parameter.RayParams(
        gcs_address=args.address,
        node_ip_address="127.0.0.1",
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
        include_log_monitor=True,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"worker node on 127.0.0.1 joined {args.address}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    main()
