#!/usr/bin/env bash
# Packs the Python packages that the lent GPU machines lack, for `bench/device/run.sh`.
#
# The device image (see the device tool's KINDS.md) has Python 3.12 with torch, transformers,
# safetensors, pyarrow, typer, rich, pillow and tensorboard, but not ray, av, zarr, numcodecs or
# webdataset, and it cannot download. A call may carry at most 64 MiB, and the ray wheel alone is
# 79 MB, so the wheels are unpacked here, ray's Java jars and RLlib (unused) are dropped, and the
# rest is written as two xz archives under DEST (default .gpu_site/, git-ignored).
#
# Usage (repository root, after `make test` or `make demo` created .venv):
#   bash bench/device/pack.sh [DEST]          PYTHON_VERSION=3.12 by default (the device's)
set -euo pipefail

dest=${1:-.gpu_site}
python=${PYTHON:-.venv/bin/python}
python_version=${PYTHON_VERSION:-3.12}
# Versions pinned to those this repository is tested with (its .venv).
version() { "$python" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
packages=()
for name in ray av zarr numcodecs google-crc32c donfig webdataset braceexpand \
    jsonschema jsonschema-specifications referencing rpds-py; do
    v=$(version "$name")
    packages+=("$name${v:+==$v}")
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" "${packages[@]}"
mkdir -p "$work/ray" "$work/rest"
for wheel in "$work"/wheels/*.whl; do
    case $(basename "$wheel") in
        ray-*) unzip -q -o "$wheel" -d "$work/ray" ;;
        *) unzip -q -o "$wheel" -d "$work/rest" ;;
    esac
done
rm -rf "$work/ray/ray/jars" "$work/ray/ray/rllib"

mkdir -p "$dest"
rm -f "$dest"/*.tar.xz
tar -cf - -C "$work/ray" . | xz -T0 -6 >"$dest/ray.tar.xz"
tar -cf - -C "$work/rest" . | xz -T0 -9 >"$dest/packages.tar.xz"
du -b "$dest"/*.tar.xz
total=$(du -cb "$dest"/*.tar.xz | tail -1 | cut -f1)
echo "packed ${packages[*]} for Python $python_version: $((total / 1048576)) MiB (a call carries at most 64 MiB with the repository)"
