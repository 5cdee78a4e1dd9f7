#!/usr/bin/env bash
# Rebuild the bundled teacher from scratch, or continue an interrupted rebuild: every stage resumes from
# its last checkpoint under artifacts/bundled/. One CPU core, lowest priority:
#   setsid nohup nice -n 19 scripts/bundled/rebuild.sh > artifacts/bundled/rebuild.log 2>&1 &
# Stages: classifier (~3 min), VAE (~10 min), UNet + text encoder (14,100 steps of a 20,000-step LR
# schedule, ~2.3 h), export (fp16) with the training logs, the teacher's quality gates, the distillation
# of its LinFusion weights (1,500 steps, ~20 min), their fp16 export into the model folder; then the tiny
# DiT (PixArt transformer + T5 encoder on the same VAE, 18,000 steps in three runs, ~1.5 h), its export (fp16) with its
# log, its gates, the distillation of its LinFusion weights and their export into the DiT folder.
# MODEL and DIT_MODEL (default: the package's bundled folders) and LOGS choose where the results go;
# arguments are passed to the UNet stage. Note: artifacts/bundled/distill and dit-distill resume, so delete
# them to re-distil.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=scripts
TRAIN="$PYTHON -m bundled.train --threads 1"
MODEL="${MODEL:-src/linfusion/bundled/model}"
DIT_MODEL="${DIT_MODEL:-src/linfusion/bundled/dit}"
LOGS="${LOGS:-scripts/bundled/logs}"
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
$TRAIN export --out "$MODEL" --copy-logs "$LOGS"
echo "[rebuild] $(date -u +%FT%TZ) gates"
$TRAIN gates
echo "[rebuild] $(date -u +%FT%TZ) distill"
$TRAIN distill-data --out artifacts/bundled/distill-data --count 8000
$PYTHON -m linfusion distill --teacher "$MODEL" --data artifacts/bundled/distill-data \
    --output artifacts/bundled/distill --resolution 32 --batch-size 16 --max-steps 1500 \
    --checkpoint-every 250 --cache-latents --resume latest
$TRAIN export-linfusion --distilled artifacts/bundled/distill --out "$MODEL/linfusion"
cp artifacts/bundled/distill/train_log.jsonl "$LOGS/distill_log.jsonl"
cp artifacts/bundled/unet/gates.jsonl "$LOGS/unet_gates.jsonl"
echo "[rebuild] $(date -u +%FT%TZ) dit"
# The committed DiT is three runs of one checkpoint (the log records each): 5,500 steps (decay from 2,500),
# on to 14,000 (a restart at the full LR, decay from 10,000), then on to 18,000 at 1.5e-4 decaying from 14,000.
$TRAIN dit --resume --steps 5500 --lr-decay-start 2500
$TRAIN dit --resume --steps 14000 --lr-decay-start 10000
$TRAIN dit --resume --steps 18000 --lr-decay-start 14000 --lr 1.5e-4 --text-lr 1.5e-4
echo "[rebuild] $(date -u +%FT%TZ) export-dit"
$TRAIN export-dit --out "$DIT_MODEL" --copy-logs "$LOGS"
echo "[rebuild] $(date -u +%FT%TZ) dit-gates"
$TRAIN dit-gates
echo "[rebuild] $(date -u +%FT%TZ) dit-distill"
$PYTHON -m linfusion distill --teacher "$DIT_MODEL" --data artifacts/bundled/distill-data \
    --output artifacts/bundled/dit-distill --resolution 32 --batch-size 16 --max-steps 5000 \
    --checkpoint-every 250 --cache-latents --resume latest
$TRAIN export-linfusion --distilled artifacts/bundled/dit-distill --out "$DIT_MODEL/linfusion"
cp artifacts/bundled/dit-distill/train_log.jsonl "$LOGS/dit_distill_log.jsonl"
cp artifacts/bundled/dit/gates.jsonl "$LOGS/dit_gates.jsonl"
echo "[rebuild] $(date -u +%FT%TZ) done"
