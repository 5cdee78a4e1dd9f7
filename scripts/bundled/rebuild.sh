#!/usr/bin/env bash
# Rebuild the bundled teacher from scratch, or continue an interrupted rebuild: every stage resumes from
# its last checkpoint under artifacts/bundled/. One CPU core, lowest priority:
#   setsid nohup nice -n 19 scripts/bundled/rebuild.sh > artifacts/bundled/rebuild.log 2>&1 &
# Stages: classifier (~3 min), VAE (~10 min), UNet + text encoder (20,000 steps, ~3.3 h), export to
# artifacts/bundled/model. Arguments are passed to the UNet stage (e.g. --steps 24000).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
TRAIN="$PYTHON scripts/bundled/train.py --threads 1"
echo "[rebuild] $(date -u +%FT%TZ) classifier"
if [ ! -f src/linfusion/bundled/classifier/model.safetensors ]; then
    $TRAIN classifier --resume
fi
echo "[rebuild] $(date -u +%FT%TZ) vae"
if [ ! -f artifacts/bundled/vae/final/diffusion_pytorch_model.safetensors ]; then
    $TRAIN vae --resume
fi
echo "[rebuild] $(date -u +%FT%TZ) unet"
$TRAIN unet --resume "$@"
echo "[rebuild] $(date -u +%FT%TZ) export"
$TRAIN export --out artifacts/bundled/model
echo "[rebuild] $(date -u +%FT%TZ) done"
