#!/usr/bin/env bash
# Submit `geovr-pipeline precompute` as a Ray job to any running Ray cluster (Jobs API on the dashboard).
#
# Usage: submit_precompute.sh DASHBOARD_URL -- [precompute options...]
#   e.g. submit_precompute.sh http://head:8265 -- --manifest /data/m.parquet --out /data/cache \
#            --teacher /models/vggt-1b --num-gpus 16 --device cuda
#
# The job's driver runs on the head node with `--ray-address auto`. The runtime environment passes
# offline flags (no hub access at run time) and, when GEOVR_PIP is set, installs that pip requirement
# (e.g. a wheel path visible to the cluster) for the job. Set NO_WAIT=1 to return right after
# submitting. Token-authenticated clusters need RAY_AUTH_MODE=token and the token
# (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) in the environment of this script.
set -euo pipefail

if [[ $# -lt 2 || "$2" != "--" ]]; then
    echo "usage: $0 DASHBOARD_URL -- [precompute options...]" >&2
    exit 2
fi
address=$1
shift 2

runtime_env=$(python - "${GEOVR_PIP:-}" <<'PY'
import json
import sys

env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
if sys.argv[1]:
    env["pip"] = [sys.argv[1]]
print(json.dumps(env))
PY
)

wait_args=()
if [[ -n "${NO_WAIT:-}" ]]; then
    wait_args=(--no-wait)
fi

exec ray job submit \
    --address "$address" \
    --submission-id "geovr-precompute-$(date +%Y%m%d-%H%M%S)-$$" \
    --runtime-env-json "$runtime_env" \
    "${wait_args[@]}" \
    -- geovr-pipeline precompute --ray-address auto "$@"
