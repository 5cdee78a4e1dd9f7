#!/usr/bin/env bash
# The checks that need a GPU, in stages that each fit one device call (10 minutes). Written for the GPU
# machine this project is sometimes lent (H100/H200, torch + triton preinstalled, no network), run from
# the repository root. diffusers is not installed there: carry its wheel (see docs/kernels.md, "GPU runs").
#
#   bash scripts/gpu/run.sh STAGE OUT_DIR
#
# STAGE: ops            triton kernels against the reference (tests/ops), ~2 min
#        attention      linfusion bench attention on CUDA, fp16/bf16, chunked + triton vs SDPA, ~6 min
#        highres-sd15   random-weight full-size SD-1.5 SDEdit chain to 16384x8192, LinFusion vs SDPA, fp16
#        highres-sdxl   the same for SD-XL (DemoFusion recipe) to 16384x8192
#        bounded-sd15   SD-1.5 SDEdit chain to 16384x8192 within --max-memory 12GB (banded UNet, tiled VAE,
#                       stores on the host as planned), LinFusion only, linear VAE attention: time and
#                       max_memory_allocated per stage against the plan's device peak (calibrates the
#                       planner's CUDA overhead constants, linfusion.planner.OVERHEAD)
#        bounded-sdxl   the same for SD-XL within --max-memory 16GB
# Raw JSON lands in OUT_DIR; commit it under benchmarks/results/ with the device named in the file name.
set -uo pipefail
STAGE="${1:?stage: ops | attention | highres-sd15 | highres-sdxl | bounded-sd15 | bounded-sdxl}"
OUT="${2:?output folder}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'diffusers', diffusers.__version__)" \
    | tee "$OUT/versions-$STAGE.txt"
case "$STAGE" in
    ops)
        timeout 500 python3 -m pytest -q -p no:cacheprovider tests/ops 2>&1 | tee "$OUT/ops-tests.log" ;;
    attention)
        timeout 550 python3 -m linfusion bench attention --device cuda --dtypes float16,bfloat16 \
            --backends chunked,triton --tokens 4096,16384,65536,262144,1048576 --wide-max-tokens 262144 \
            --repeats 10 --warmup 3 --sdpa-cap-seconds 20 --sdpa-budget-seconds 120 --out "$OUT" --tag gpu --no-plot ;;
    highres-sd15)
        timeout 580 python3 -m linfusion bench highres --model random-sd15 --size 16384x8192 --mode sdedit \
            --device cuda --dtype float16 --threads 0 --steps 8 --attention linfusion,sdpa \
            --sdpa-cap-seconds 60 --timeout 280 --out "$OUT" --tag gpu ;;
    highres-sdxl)
        timeout 580 python3 -m linfusion bench highres --model random-sdxl --size 16384x8192 --mode demofusion \
            --device cuda --dtype float16 --threads 0 --steps 8 --attention linfusion,sdpa \
            --sdpa-cap-seconds 60 --timeout 280 --out "$OUT" --tag gpu ;;
    bounded-sd15)
        timeout 580 python3 -m linfusion bench highres --model random-sd15 --size 16384x8192 --mode sdedit \
            --device cuda --dtype float16 --threads 0 --steps 8 --attention linfusion --vae-attention linear \
            --max-memory 12GB --timeout 560 --out "$OUT" --tag gpu-12GB ;;
    bounded-sdxl)
        timeout 580 python3 -m linfusion bench highres --model random-sdxl --size 16384x8192 --mode sdedit \
            --device cuda --dtype float16 --threads 0 --steps 8 --attention linfusion --vae-attention linear \
            --max-memory 16GB --timeout 560 --out "$OUT" --tag gpu-16GB ;;
    *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
