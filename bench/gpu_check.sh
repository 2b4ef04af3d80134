#!/usr/bin/env bash
# GPU check of issue 3 ("the whole PoC at the GPU's speed, input pipeline included"), for one lent H100.
#
# One device call, so that every ratio compares figures from the same machine and process:
#   1. `visionpoc bench`: the timm (eager, compiled) and HF peers on synthetic tensors, the PIL DataLoader
#      vs the prepared store + gpu_aug, and our training step fed from the store vs from synthetic tensors
#      (ViT-B/16 bs 256, Xception top-10% and full bs 128; bf16, fused AdamW, torch.compile);
#   2. the shared peer anchor (outside reference, --quick: no compile), when it was carried along.
#
# Before the call, on the session machine (the anchor is not in the repo; /build/ is git-ignored):
#   mkdir -p build/bench && cp /work/shared/bench/peer_anchor.py build/bench/
# Then with the device tool:  run(command="bash bench/gpu_check.sh", carry=["build/bench"], timeout_s=590)
# Results: $OUT/bench.json and bench.txt (ours + peers), peer_anchor.json, env.txt -> docs/benchmarks.md.
# Expect ~6-7 min for the bench (seven torch.compile warm-ups of 30-50 s; the last, ViT-B/16 at batch 512,
# is the first thing the 430 s limit cuts) and ~1.5 min for the anchor.
# PEER_ANCHOR=0 skips the anchor; BENCH_ARGS="--sections peer,input,ours" skips the HF peer, for example.
set -uo pipefail
PY=${PYTHON:-python3}  # the device image's interpreter with PyTorch is python3
OUT=${OUT:-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'; } | tee "$OUT/env.txt"
PYTHONPATH=src "$PY" -c 'import visionpoc.bench.run' || { echo "visionpoc does not import here (missing deps?)"; exit 2; }
# shellcheck disable=SC2086
PYTHONPATH=src timeout 430 "$PY" -m visionpoc bench --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
echo "bench exit status: ${PIPESTATUS[0]}"
if [ "${PEER_ANCHOR:-1}" = 1 ] && [ -f build/bench/peer_anchor.py ]; then
  timeout 140 "$PY" build/bench/peer_anchor.py --quick --out "$OUT" 2>&1 | tail -n 20 | tee "$OUT/peer_anchor.log"
fi
