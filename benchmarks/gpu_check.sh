#!/usr/bin/env bash
# Every GPU figure the README quotes, in one run that fits a short GPU loan (about 8 minutes on an H100):
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (OUT_DIR default: $OUT or .artifacts/gpu)
# 1. each method's modes at 128->512 and 512->2048, fp16 and fp32 (time, peak GPU memory);
# 2. the VAE decoder alone, exact tiling, 2048x2048 output;
# 3. the side-by-side with the authors' code (benchmarks/compare_official.py) when their checkouts and
#    venvs are at ../official (docs/compare_official.md), every case, one round.
# Each step has its own time limit, so one slow step cannot eat the loan; JSON goes to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.artifacts/gpu}}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E '^\s*$|it/s\]' | tail -n 40
  echo "== $name: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}
for dt in fp16 fp32; do
  step 150 "methods-$dt" "$py" benchmarks/bench_methods.py --method pisa s3diff patchscaler --size sd21 \
    --device cuda --dtype "$dt" --input 128 512 --warmup 2 --repeats 5 --json "$out/methods-$dt.json"
done
step 60 vae-decoder "$py" benchmarks/bench_vae_tiling.py --size sd21 --device cuda --dtype fp16 --outputs 2048
if [ -x ../official/pisa-venv/bin/python ] && [ -x ../official/s3diff-venv/bin/python ]; then
  step 200 compare-official "$py" benchmarks/compare_official.py --official-root ../official \
    --official-python pisa=../official/pisa-venv/bin/python --official-python s3diff=../official/s3diff-venv/bin/python \
    --device cuda --rounds 1 --cases pisa-default-128 pisa-adjustable-128 s3diff-128 pisa-default-512 \
    pisa-adjustable-512 s3diff-512 vae-decoder-256 --json "$out/compare-official.json"
else
  echo "== compare-official skipped: no ../official venvs (docs/compare_official.md)"
fi
