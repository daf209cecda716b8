#!/usr/bin/env bash
# Runs the GPU benchmarks on a lent GPU machine, from the repository root, with the packages that
# `bench/device/pack.sh` packed into .gpu_site/ (carried with the call). JSON results go to $OUT
# (the device tool's output folder) when set, else bench/results/.
#
#   bash bench/device/run.sh check                  versions, GPU, imports (seconds)
#   bash bench/device/run.sh teacher precompute     then train: each about 3-5 minutes on an H100
#   bash bench/device/run.sh smoke                  the CPU smoke runs of all three (tiny models)
set -euo pipefail

site=${GEOVR_SITE:-/tmp/geovr_site}
if [ ! -d "$site/geovr" ]; then
    mkdir -p "$site/geovr"
    for archive in .gpu_site/*.tar.xz; do
        tar -xJf "$archive" -C "$site"
    done
    # The repository's folders are the subpackages of the `geovr` namespace (as pyproject.toml maps them).
    for package in app eval pipeline student teachers corpus teacher_cache configs; do
        ln -s "$PWD/$package" "$site/geovr/$package"
    done
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
out=${OUT:-bench/results}
mkdir -p "$out"

for target in "$@"; do
    echo "=== $target ($(date -u +%H:%M:%S))"
    case $target in
        check)
            "$python" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("ray", "av", "zarr", "numcodecs", "webdataset", "transformers", "xformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as err:
        print(name, "missing:", err)
import geovr.app.cli, geovr.pipeline.precompute, geovr.student.training.trainer, geovr.teacher_cache.store  # noqa: E401
print("geovr imports ok")
PY
            ;;
        teacher) "$python" bench/teacher_throughput.py --labeler --out "$out/teacher_throughput.json" ;;
        precompute) "$python" bench/precompute_throughput.py --out "$out" ;;
        train) "$python" bench/train_throughput.py --out "$out/train_throughput.json" ;;
        smoke)
            "$python" bench/teacher_throughput.py --tiny --labeler --iters 1 --warmup 0 --out "$out/teacher_smoke.json"
            "$python" bench/precompute_throughput.py --model tiny --device cpu --clips 4 --frames 12 \
                --size 160x120 --scenes 2 --iters 2 --warmup 1 --work /tmp/geovr_precompute_smoke --out "$out"
            "$python" bench/train_throughput.py --tiny --steps 2 --warmup 1 --workers 1 --out "$out/train_smoke.json"
            ;;
        *)
            echo "unknown target $target (check, teacher, precompute, train, smoke)" >&2
            exit 2
            ;;
    esac
done
