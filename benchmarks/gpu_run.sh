#!/usr/bin/env bash
# The device check of the CUDA paths in one go, about 6 minutes on an H200 (each step time-boxed):
#   1. tests/test_cuda.py (parity of the ops and rewrites on CUDA, the fused kernel against blockwise)
#   2. benchmarks/cuda_attention.py (memory and time: naive, SDPA, rewritten; HF models; Performer)
# Run from the repository root: `bash benchmarks/gpu_run.sh`. Everything goes under $OUT (default gpu_out/);
# the end of stdout repeats the test summary and the benchmark's table.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1

timeout 170 python -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/test_cuda.xml" \
    > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit status: $?" >> "$OUT/test_cuda.txt"

timeout 230 python benchmarks/cuda_attention.py --max-seconds 170 --repeats 2 --json "$OUT/cuda_attention.json" \
    > "$OUT/cuda_attention.md" 2> "$OUT/cuda_attention.log"
echo "cuda_attention exit status: $?" >> "$OUT/cuda_attention.log"

cat "$OUT/device.txt"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|exit status" "$OUT/test_cuda.txt" | tail -60
tail -3 "$OUT/cuda_attention.log"
cat "$OUT/cuda_attention.md"
