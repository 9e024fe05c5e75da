#!/usr/bin/env bash
# The checks that need a GPU, in one go, within a time budget (BUDGET seconds, default 540), most telling first:
#   1. tests on CUDA: the Triton kernels against the reference (tests/test_kernels.py) and the graphed decode
#      step against the eager one with real CUDA graphs (tests/test_graphs.py);
#   2. bench/decode_step.py on MODEL_DIR's shapes, bf16: a 32-row step, eager vs graphs, reference vs Triton;
#   3. bench/e2e_bench.py on CUDA in bf16 (32 gRPC clients x 32 tokens; random weights with MODEL_DIR's shapes,
#      bench/random_base.py), Triton kernels and graphs on;
#   4. the engine loop under 32 streaming clients, sampled with py-spy (--gil: who holds the GIL), raw stacks;
#   5. bench/decode_step.py on a larger model (LARGE_DIR, e.g. a 1B-class Llama config): 1, 8, 64 distinct LoRAs;
#   6. the server tests on CUDA (HUB_TEST_DEVICE=cuda), with what time is left.
# Usage: bash bench/cuda_checks.sh MODEL_DIR [LARGE_DIR]   (each DIR: a config.json; MODEL_DIR also a tokenizer)
# Logs go to $OUT (default ./cuda-checks), at most eight files. Wheels in .whl/ (for a machine without an index)
# are installed into /tmp/site first. A step starts only if its time limit fits in what is left of the budget.
set -u
src=${1:?usage: bash bench/cuda_checks.sh MODEL_DIR [LARGE_DIR]}; large=${2:-}
out=${OUT:-cuda-checks}; mkdir -p "$out"
end=$(( $(date +%s) + ${BUDGET:-540} ))
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/env.txt" 2>&1 || { cat "$out/env.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; export PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# run LIMIT LOG CMD...: CMD with a time limit, its output appended to LOG, skipped when the budget cannot hold it
run() {
  local limit=$1 log=$2; shift 2
  local left=$(( end - $(date +%s) ))
  if (( left < limit )); then echo "== skipped ($left s left, needs $limit): $*" | tee -a "$log"; return; fi
  echo "== $(date +%T) $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout "$limit" "$@" >> "$log" 2>&1; local rc=$?
  echo "== rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$log"
}
python3 -c "import torch, transformers, peft, grpc, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'grpc', grpc.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')
import runtime.server, runtime.http, runtime.kernels.triton_ops" 2>&1 | tee -a "$out/env.txt"
tests="$out/tests_cuda.txt"
# deselected: the fused CPU kernels, built with that image's compiler, crashed (SIGSEGV) when their range check
# threw; they never run on CUDA tensors
HUB_TEST_DEVICE=cuda run 120 "$tests" python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_kernels.py \
  tests/test_graphs.py --deselect "tests/test_kernels.py::test_out_of_range_uses_raise_instead_of_reading_memory[cpu]"
tail -3 "$tests"
run 120 "$out/decode_step.txt" python3 bench/decode_step.py --device cuda --dtype bfloat16 --base-model "$src"
tail -12 "$out/decode_step.txt"
python3 bench/random_base.py "$src" /tmp/random-base > /dev/null 2>&1
HUB_KERNELS=triton run 200 "$out/e2e_cuda_bf16.txt" python3 bench/e2e_bench.py --device cuda --dtype bfloat16 \
  --base-model /tmp/random-base --repeats 3 --cold 4
tail -22 "$out/e2e_cuda_bf16.txt"
# py-spy attaches to the server once it is up (--subprocesses did not follow the bench's server here)
spy() {
  python3 bench/e2e_bench.py --device cuda --dtype bfloat16 --base-model /tmp/random-base --repeats 1 --cold 1 \
    --no-peft & local bench=$! pid=
  for _ in $(seq 120); do pid=$(pgrep -f "hub serve" | head -1); [[ -n "$pid" ]] && break; sleep 0.5; done
  [[ -n "$pid" ]] && py-spy record --pid "$pid" --gil --threads --nonblocking -r 200 -d 40 --format raw \
    -o "$out/loop_spy_raw.txt"
  wait "$bench"
  python3 bench/gil_share.py "$out/loop_spy_raw.txt" --top 10
}
export -f spy; export out
HUB_KERNELS=triton run 80 "$out/loop_spy.txt" bash -c spy
tail -30 "$out/loop_spy.txt"
[[ -n "$large" ]] && run 120 "$out/decode_step.txt" python3 bench/decode_step.py --device cuda --dtype bfloat16 \
  --base-model "$large" --rows 64 --sizes 1,8,64 --shapes q,v --graphs-only --repeats 2 && tail -8 "$out/decode_step.txt"
HUB_TEST_DEVICE=cuda run 100 "$tests" python3 -m pytest -q -p no:cacheprovider -W ignore -x tests/test_server.py \
  tests/test_server_errors.py tests/test_merge_server.py tests/test_server_promises.py
tail -3 "$tests"
