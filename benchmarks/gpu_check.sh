#!/usr/bin/env bash
# The one prepared GPU check (about 12 minutes on one H200-class GPU, plus at most 5 for check 4). Run from the
# repository root with the environment installed (make install); results land in $OUT (default results/gpu).
#  0. The paths users take, on CUDA: tests/test_paths.py's matrix (every method family x fp32/bf16 x tied/untied x
#     both formats, whole and device-mapped; compute in bf16 for the bf16 checkpoints) and the device-independent
#     model-drawn labels.
#  1. SmolLM2-135M perplexity on cuda equals the CPU's within 1e-3 (relative): same protocol as the README.
#  2. A LLaMA-3-8B-shaped random checkpoint (32 blocks, hidden 4096, bf16, 16 GB) compressed end to end on cuda
#     with svdllm 0.4 and 8 x 512 calibration tokens: wall time, peak host RSS and peak GPU memory.
#  3. The multi-process path on CUDA: the same SmolLM2 compression through torchrun with NCCL, world size 1.
#  4. The default method (ada-kfac-rf) on 4 blocks of the 8B shape with the 128k vocabulary, 8 x 512 tokens: time per
#     block and peak GPU memory (stopped after DEFAULT_TIMEOUT s, 300 by default, so the loan's budget holds).
set -euo pipefail
OUT=${OUT:-results/gpu}
PY=${PY:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 0. the path matrix on cuda
SVDKIT_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/test_paths.py \
    tests/test_gradients.py::test_model_drawn_labels_do_not_depend_on_the_device > "$OUT/paths_cuda.txt" 2>&1 \
    || echo "PATH MATRIX FAILED on cuda (the other checks go on): see $OUT/paths_cuda.txt"
tail -3 "$OUT/paths_cuda.txt"

# 1. perplexity, cuda vs cpu (fp32 checkpoint: compute stays fp32, TF32 is off while evaluating)
$PY -m svdkit eval --model smollm2-135m --data ptb,wiki --seqlen 512 --max-windows 40 --device cuda \
    --json "$OUT/eval_cuda.json"
$PY -m svdkit eval --model smollm2-135m --data ptb,wiki --seqlen 512 --max-windows 40 --device cpu \
    --json "$OUT/eval_cpu.json"
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
gpu, cpu = (json.load(open(f"{out}/eval_{d}.json"))["perplexity"] for d in ("cuda", "cpu"))
rel = {k: abs(gpu[k]["ppl"] - cpu[k]["ppl"]) / cpu[k]["ppl"] for k in cpu}
print("relative perplexity difference cuda vs cpu:", rel)
assert all(v <= 1e-3 for v in rel.values()), rel
EOF

# 2. an 8B-shaped checkpoint written block by block, then compressed on the GPU
$PY - "$OUT" <<'EOF'
import sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
from scale import llama_config, write_checkpoint
t0 = time.time()
size = write_checkpoint(Path(sys.argv[1]) / "llama3-8b-shape", llama_config(4096, 14336, 32, 8, 32))
print(f"checkpoint: {size / 1e9:.1f} GB written in {time.time() - t0:.0f} s")
EOF
/usr/bin/time -v $PY -m svdkit compress --model "$OUT/llama3-8b-shape" --method svdllm --ratio 0.4 --calib wiki \
    --nsamples 8 --seqlen 512 --device cuda --out "$OUT/llama3-8b-shape-svdllm" --overwrite 2> "$OUT/time_8b.txt"
grep -E "Maximum resident|Elapsed" "$OUT/time_8b.txt"
$PY -c "import json; r = json.load(open('$OUT/llama3-8b-shape-svdllm/svdkit_report.json')); \
print('compress s', r['seconds'], 'peak GPU GB', r['extra'].get('peak_device_bytes', 0) / 1e9)"
rm -rf "$OUT/llama3-8b-shape" "$OUT/llama3-8b-shape-svdllm"

# 3. torch.distributed on CUDA: NCCL, one rank
$PY -m torch.distributed.run --nproc-per-node 1 -m svdkit compress --model smollm2-135m --method svdllm --ratio 0.4 \
    --nsamples 64 --seqlen 512 --device cuda --out "$OUT/smollm2-svdllm-nccl" --overwrite --eval ptb,wiki
# 4. the default method on 4 blocks of the 8B shape (its cost per block; the whole model is 32 of them)
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from scale import llama_config, write_checkpoint
write_checkpoint(Path(sys.argv[1]) / "llama3-8b-4blocks", llama_config(4096, 14336, 32, 8, 4, vocab=128256))
EOF
if /usr/bin/time -v timeout "${DEFAULT_TIMEOUT:-300}" $PY -m svdkit compress --model "$OUT/llama3-8b-4blocks" \
    --ratio 0.4 --calib wiki --nsamples 8 --seqlen 512 --device cuda --out "$OUT/llama3-8b-4blocks-default" \
    --overwrite 2> "$OUT/time_8b_default.txt"; then
  $PY -c "import json; r = json.load(open('$OUT/llama3-8b-4blocks-default/svdkit_report.json')); \
print('default, 4 blocks: compress s', r['seconds'], 'peak GPU GB', r['extra'].get('peak_device_bytes', 0) / 1e9)"
else
  echo "DEFAULT METHOD on 4 blocks did not finish within ${DEFAULT_TIMEOUT:-300} s: see $OUT/time_8b_default.txt"
fi
grep -E "Maximum resident|Elapsed" "$OUT/time_8b_default.txt" || true
rm -rf "$OUT/llama3-8b-4blocks" "$OUT/llama3-8b-4blocks-default"
echo "gpu check done: $OUT"
