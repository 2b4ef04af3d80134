#!/usr/bin/env bash
# Whole-run timing of issue 3 for one lent GPU: the default `visionpoc compare` (Xception vs ViT-B/16,
# default epochs, from JPEGs; the one-time store preparation, compilation and the report included) on a
# stand-in Stanford Dogs made by bench/fake_dogs.py (the device has no network: no dataset, no pretrained
# weights, so `pretrained: false`; speed does not depend on the weights). Target: <= 5 minutes on one H100.
#
# Device tool: run(command="bash bench/gpu_compare.sh", timeout_s=590). About 20 s to write the
# 20,580 JPEGs with 16 cores, then the run. Results in $OUT: compare.log, results.json, report.md, time.txt.
# CPU dry run (tiny): FAKE_ARGS="--classes 3 --train 6 --test 6 --size 64x48" \
#   EXTRA="--set train.epochs=1 --set models.0.img_size=64 --set models.1.img_size=32" bash bench/gpu_compare.sh
set -uo pipefail
PY=${PYTHON:-python3}  # the device image's interpreter with PyTorch is python3
OUT=${OUT:-out}
DATA=${DATA:-/tmp/fake_dogs}
RUN=${RUN:-/tmp/fake_dogs_run}
mkdir -p "$OUT"
rm -rf "$DATA" "$RUN"
"$PY" bench/fake_dogs.py "$DATA" ${FAKE_ARGS:-} || exit 2
start=$("$PY" -c 'import time; print(time.time())')
# shellcheck disable=SC2086
PYTHONPATH=src timeout "${LIMIT:-480}" "$PY" -m visionpoc compare --out "$RUN" \
  --set data.root="$DATA" --set data.download=false \
  --set models.0.pretrained=false --set models.1.pretrained=false ${EXTRA:-} > "$OUT/compare.log" 2>&1
status=$?
end=$("$PY" -c 'import time; print(time.time())')
tail -n 25 "$OUT/compare.log"
printf 'compare exit status %s, whole run %s s (data generation excluded)\n' "$status" \
  "$("$PY" -c "print(round($end - $start, 1))")" \
  | tee "$OUT/time.txt"
cp "$RUN/results.json" "$RUN/report.md" "$OUT/" 2>/dev/null
exit "$status"
