#!/usr/bin/env bash
# The checks that need a GPU, in one go (what a lent GPU machine runs in about ten minutes):
#   1. the kernel seam: tests/test_kernels.py (the Triton kernels on CUDA against the reference) and
#      bench/kernel_bench.py on CUDA (reference vs Triton per op, the stacked LoRA path vs slots + Triton);
#      triton comes with a CUDA torch, or from .whl/ (its wheel: triton==3.7.1);
#   2. the server tests with the served base and their PEFT peers on CUDA (HUB_TEST_DEVICE=cuda);
#   3. bench/gpu_check.py: the engine against PEFT on CUDA, fp32 and bf16;
#   4. bench/e2e_bench.py on CUDA in bf16, on a base with the default model's shapes and random weights
#      (bench/random_base.py), each configuration's tokens/s printed as it finishes.
# Usage: bash bench/cuda_checks.sh MODEL_DIR [E2E_ARGS...]   (MODEL_DIR: config.json + tokenizer suffice)
# Writes its logs to $OUT (default ./cuda-checks). Wheels in .whl/ (for a machine without an index) are
# installed into /tmp/site first. Each step has a time limit, so one that hangs does not take the rest.
set -u
src=${1:?usage: bash bench/cuda_checks.sh MODEL_DIR [E2E_ARGS...]}; shift
out=${OUT:-cuda-checks}; mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
stamp() { while IFS= read -r line; do echo "$(date +%T) $line"; done; }
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 | tee "$out/env.txt"
echo "== kernel tests on CUDA (Triton vs the reference)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_kernels.py > "$out/kernel_tests_cuda.txt" 2>&1
tail -3 "$out/kernel_tests_cuda.txt"
echo "== kernel bench on CUDA (bf16 and fp32)"
timeout 180 python3 bench/kernel_bench.py --device cuda --no-loop > "$out/kernel_bench_cuda.txt" 2>&1
grep -v "|" "$out/kernel_bench_cuda.txt" | tail -40
echo "== server tests on CUDA"
HUB_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_server.py \
  tests/test_server_errors.py tests/test_server_textstream.py tests/test_merge_server.py tests/test_server_security.py \
  tests/test_server_soak.py tests/test_server_promises.py > "$out/server_tests_cuda.txt" 2>&1
tail -3 "$out/server_tests_cuda.txt"
echo "== engine vs PEFT on CUDA"
timeout 120 python3 bench/gpu_check.py > "$out/gpu_check.txt" 2>&1; tail -1 "$out/gpu_check.txt"
echo "== e2e bench on CUDA (bf16, random weights with the shapes of $src)"
timeout 120 python3 bench/random_base.py "$src" /tmp/random-base
timeout 420 python3 bench/e2e_bench.py --device cuda --dtype bfloat16 --base-model /tmp/random-base "$@" 2>&1 \
  | grep --line-buffered -v "Loading weights" | stamp > "$out/e2e_cuda_bf16.txt"
tail -25 "$out/e2e_cuda_bf16.txt"
