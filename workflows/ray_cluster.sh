#!/usr/bin/env bash
# Start, wait for, and stop a Ray cluster over the nodes of an allocation.
#
# Usage: ray_cluster.sh start | stop | address | env
#
#   start    start the head and the workers, wait until every node has joined
#   stop     stop exactly the processes `start` started (not every Ray process of the user)
#   address  print the head's GCS address (host:port)
#   env      print the exports a driver needs to join: eval "$(ray_cluster.sh env)"
#
# Inside Slurm the head runs on the first node of $SLURM_JOB_NODELIST and one worker per other node is
# started with `srun --overlap`; every node binds to its Slurm NodeAddr (the address slurmctld reaches
# it on), not to whatever its hostname resolves to. Outside Slurm (or with RAY_NODE_LAUNCH=local) every
# node runs on this host on 127.0.0.1, which is how the tests run two Ray nodes on loopback. A head on a
# loopback address (a one-node test cluster whose NodeAddr is 127.0.0.1) keeps Ray on loopback. Each
# node runs in the foreground of a background job whose PID is recorded, so `stop` can end it with SIGTERM.
#
# The cluster uses Ray's token authentication with a fresh token in $RAY_CLUSTER_DIR/auth_token
# (the directory must be on a filesystem every node sees, as a Slurm job's working directory is).
#
# Environment (all optional):
#   RAY_HEAD_IP            head address (default: first Slurm node's NodeAddr, else 127.0.0.1)
#   RAY_PORT               GCS port of the head (default 6379)
#   RAY_DASHBOARD_PORT     dashboard / Jobs API port of the head (default 8265)
#   RAY_NODES              number of nodes (default $SLURM_JOB_NUM_NODES, else 1)
#   RAY_NODE_LAUNCH        srun | local (default: srun inside Slurm, local outside)
#   RAY_CPUS_PER_NODE      (default $SLURM_CPUS_ON_NODE, else nproc)
#   RAY_GPUS_PER_NODE      (default $SLURM_GPUS_ON_NODE, else 0)
#   RAY_CLUSTER_DIR        PIDs, logs, address and token (default ./ray-cluster-${SLURM_JOB_ID:-local})
#   RAY_START_TIMEOUT      seconds to wait for all nodes (default 300)
#   RAY_HEAD_EXTRA_ARGS    more `ray start --head` options, space-separated (e.g. fixed ports)
#   PYTHON                 the Python of the environment that has ray (default: python)
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
nodes=${RAY_NODES:-${SLURM_JOB_NUM_NODES:-1}}
cpus=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
gpus=${RAY_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
cluster_dir=${RAY_CLUSTER_DIR:-$PWD/ray-cluster-${SLURM_JOB_ID:-local}}
timeout=${RAY_START_TIMEOUT:-300}

hosts=()
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    launch=${RAY_NODE_LAUNCH:-srun}
else
    launch=${RAY_NODE_LAUNCH:-local}
fi

# Ray keeps a loopback address as given only with this set (see ray_local_worker.py).
keep_loopback() { export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; }
if [[ $launch == local ]]; then
    keep_loopback
fi
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$cluster_dir/auth_token"
# Every node runs under subreaper.py: a worker whose raylet is killed first (Slurm's SIGTERM/SIGKILL on a
# requeue or scancel) is re-parented to it and ended with the node, instead of outliving the job.
guard=("$python" "$script_dir/subreaper.py" "$python")

# `stop` ends the whole cluster once its driver is done: no node drains first (Ray's SIGTERM handler
# would wait up to 30 s for that, outlasting the SIGTERM-to-SIGKILL grace of `stop` and of Slurm).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

# The IPv4 address of Slurm node $1: its NodeAddr, resolved here when it is a name.
node_ip() {
    local node_addr
    node_addr=$(scontrol show node --oneliner "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    getent ahostsv4 "$node_addr" | awk 'NR == 1 {print $1}'
}

head_ip() {
    if [[ -n "${RAY_HEAD_IP:-}" ]]; then
        echo "$RAY_HEAD_IP"
    elif [[ $launch == srun ]]; then
        node_ip "${hosts[0]}"
    else
        echo 127.0.0.1
    fi
}

alive_nodes() {
    "$python" - "$1" <<'PY' 2>/dev/null || echo 0
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for node in ray.nodes() if node["Alive"]))
PY
}

wait_for_nodes() {
    local address=$1 want=$2 deadline=$((SECONDS + timeout)) alive=0
    while ((SECONDS < deadline)); do
        alive=$(alive_nodes "$address")
        if ((alive >= want)); then
            echo "ray_cluster: $alive/$want nodes alive at $address"
            return 0
        fi
        sleep 2
    done
    echo "ray_cluster: only $alive/$want nodes joined $address within ${timeout}s; logs in $cluster_dir" >&2
    return 1
}

start() {
    mkdir -p "$cluster_dir"
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        (umask 077 && "$python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
    fi
    local ip address
    ip=$(head_ip)
    if [[ -z $ip ]]; then
        echo "ray_cluster: cannot resolve the head node's address; set RAY_HEAD_IP" >&2
        return 1
    fi
    if [[ $ip == 127.* ]]; then
        if ((nodes > 1)) && [[ $launch == srun ]]; then
            echo "ray_cluster: the head address $ip is loopback, which other nodes cannot reach; set RAY_HEAD_IP" >&2
            return 1
        fi
        keep_loopback
    fi
    address="$ip:$port"
    echo "$address" >"$cluster_dir/address"
    # The dashboard serves the Jobs API (`ray job submit`) and the cluster web UI.
    local head_args=(--head --node-ip-address="$ip" --port="$port" --dashboard-host="$ip"
        --dashboard-port="$dashboard_port" --include-dashboard=true
        --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats --block)
    local extra_args=()
    read -ra extra_args <<<"${RAY_HEAD_EXTRA_ARGS:-}"
    head_args+=("${extra_args[@]}")

    if [[ $launch == srun ]]; then
        srun --nodes=1 --ntasks=1 --overlap -w "${hosts[0]}" --export=ALL \
            "${guard[@]}" -m ray.scripts.scripts start "${head_args[@]}" \
            >"$cluster_dir/head.log" 2>&1 &
    else
        "${guard[@]}" -m ray.scripts.scripts start "${head_args[@]}" >"$cluster_dir/head.log" 2>&1 &
    fi
    echo $! >"$cluster_dir/head.pid"
    wait_for_nodes "$address" 1
    ((nodes > 1)) || return 0

    for ((i = 1; i < nodes; i++)); do
        if [[ $launch == srun ]]; then
            srun --nodes=1 --ntasks=1 --overlap -w "${hosts[$i]}" --export=ALL \
                "${guard[@]}" -m ray.scripts.scripts start --address="$address" \
                --node-ip-address="$(node_ip "${hosts[$i]}")" --num-cpus="$cpus" --num-gpus="$gpus" \
                --disable-usage-stats --block >"$cluster_dir/worker-$i.log" 2>&1 &
        else
            "${guard[@]}" "$script_dir/ray_local_worker.py" "$address" --num-cpus "$cpus" --num-gpus "$gpus" \
                >"$cluster_dir/worker-$i.log" 2>&1 &
        fi
        echo $! >"$cluster_dir/worker-$i.pid"
    done
    wait_for_nodes "$address" "$nodes"
}

stop() {
    [[ -d "$cluster_dir" ]] || return 0
    local pidfile pid
    # Workers first, then the head; each node's launcher ends its processes on SIGTERM.
    for pidfile in "$cluster_dir"/worker-*.pid "$cluster_dir"/head.pid; do
        [[ -f "$pidfile" ]] || continue
        pid=$(<"$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    echo "ray_cluster: stopped"
}

print_env() {
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    if [[ $launch == local || $(cut -d: -f1 "$cluster_dir/address") == 127.* ]]; then
        echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    fi
    echo "export RAY_ADDRESS=$(cat "$cluster_dir/address")"
    echo "export RAY_JOBS_ADDRESS=http://$(cut -d: -f1 "$cluster_dir/address"):$dashboard_port"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    address) cat "$cluster_dir/address" ;;
    env) print_env ;;
    *)
        echo "usage: $0 start|stop|address|env" >&2
        exit 2
        ;;
esac
