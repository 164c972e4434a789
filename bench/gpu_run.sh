#!/bin/bash
# One lent-GPU session's checks and benchmarks, in one call (the device time is short: every step has a
# timeout and the whole script a deadline). Run from the repository root on the GPU host:
#     bash bench/gpu_run.sh OUTDIR [STEP ...]        (default steps: all, in the order below)
# Needs the wheels of ../shared/tools/gpu_wheels.sh in .whl/ (NIXL and pyzmq; the host has the rest).
# Writes OUTDIR/summary.txt (one line per step) and OUTDIR/results.tgz (logs + bench/results/<device>/),
# refreshed after every step so a cut-off run still returns what it finished.
set -u
OUT=${1:?usage: bench/gpu_run.sh OUTDIR [STEP ...]}
shift
STEPS=${*:-"build diag tests roofline transfer attention kv_pack serving"}
DEADLINE=$(( $(date +%s) + ${DUET_GPU_RUN_SECONDS:-450} ))
LOGS=/tmp/duet-gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0
# Compile the extension with the system g++, whose libstdc++ the process loads. The image's own toolchain
# (/opt/gcc, which the image also exports as CXX) built a module carrying its own copy of the iostream code,
# which crashed on the first error message (bench/results/h200/logs/run2_diag.log). Not yet verified on a
# GPU host: run 3 still built with /opt/gcc because CXX was already set.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$LOGS/pip.log" 2>&1
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  >"$LOGS/env.log" 2>&1
git_commit=${DUET_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $git_commit, $(tail -1 "$LOGS/env.log")" | tee "$OUT/summary.txt"

pack() { tar czf "$OUT/results.tgz" -C /tmp duet-gpu-logs -C "$PWD" bench/results 2>/dev/null; }

# step NAME TIMEOUT_S CMD...: run with min(TIMEOUT_S, time left), log to $LOGS/NAME.log, summarise.
step() {
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 15 )); then echo "$name: skipped (deadline)" | tee -a "$OUT/summary.txt"; return; fi
  (( limit > left )) && limit=$left
  start=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s): $(grep -E 'passed|failed|error' "$LOGS/$name.log" | tail -1)" \
    | tee -a "$OUT/summary.txt"
  pack
}

for s in $STEPS; do
  case $s in
    build) step build 240 python3 setup.py build_ext --inplace ;;
    diag) step diag 60 bash -c 'ldd kernels/_C*.so | grep -E "stdc|gcc_s|torch"; which -a g++; g++ --version | head -1;
             python3 -c "import torch, ctypes; import kernels._C; print(sorted({l.split()[-1] for l in open(\"/proc/self/maps\") if \"libstdc\" in l or \"libgcc_s\" in l}))";
             python3 -c "import torch; torch.zeros(2).view(3)" 2>&1 | tail -1;
             cuda-gdb -batch -ex run -ex bt --args python3 -c "import torch, kernels._C; torch.ops.duet.gather_kv_blocks(torch.zeros(4,2,12,16,2), torch.tensor([1]), 0, 1, torch.zeros(1,2,1,16,2))" 2>&1 | tail -40' ;;
    tests) step tests 200 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 90 -rfE tests/kernels \
             tests/engine/test_cuda_graphs.py tests/engine/test_triton_backend.py tests/engine/test_models_vs_hf.py \
             tests/engine/test_attention_backend.py tests/transfer ;;
    tests_quick) step tests_quick 120 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 90 -rfE \
             tests/kernels/test_kv_blocks.py tests/engine/test_cuda_graphs.py tests/engine/test_triton_backend.py \
             tests/engine/test_models_vs_hf.py tests/engine/test_attention_backend.py tests/kernels/test_layer_kernels.py ;;
    roofline) step roofline 200 python3 -m bench.decode_roofline --record ;;
    transfer) step transfer 90 python3 -m bench.transfer --backend nixl --tokens 4096 --device cuda --record ;;
    attention) step attention 120 python3 -m bench.attention --device cuda --record ;;
    kv_pack) step kv_pack 60 python3 -m bench.kv_pack --device cuda --record ;;
    serving) step serving 150 python3 -m bench.pd_vs_colocated --gpu --kv-transport nixl --record --prompt-lens 1024,4096 \
               --output-len 128 --concurrency 8 --num-requests 24 ;;
    *) echo "unknown step $s" | tee -a "$OUT/summary.txt" ;;
  esac
done
cat "$OUT/summary.txt"
