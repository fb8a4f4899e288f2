#!/usr/bin/env bash
# Everything a borrowed GPU is for, in one command: install, the test modules that exercise
# the GPU (tests/test_cuda.py and the kernels' own), then the benchmarks of each issue, in priority order. Each step
# runs under its own time cap so one slow step cannot eat the others' time; the combined log
# and the result tables land in OUT_DIR.
#
#   benchmarks/gpu_session.sh OUT_DIR
#
# Expects the GPU machine's Python with torch and triton installed (nothing is downloaded).
# diffusers, which the slicing benchmark needs, is installed from wheels in .whl/ when present.
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
log=$out/run.log
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

say() { echo "== $(date +%T) $*" | tee -a "$log"; }
capped() {  # capped SECONDS NAME COMMAND...: run, log, report exit status and duration
  local cap=$1 name=$2 begin=$SECONDS
  shift 2
  say "$name: start (cap ${cap}s)"
  timeout -k 5 "$cap" "$@" >>"$log" 2>&1
  say "$name: exit $? after $((SECONDS - begin))s"
}

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } >>"$log" 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
capped 90 install $py -m pip install -q --no-deps --no-build-isolation -e .
$py -c "import torch, triton, memopt; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$log" 2>&1

# Tests (correctness only, nothing timed) overlap the compilation of im2win's kernels.
say "tests: start in background"
(timeout -k 5 140 $py -m pytest -q -p no:cacheprovider -n 6 --tb=short tests/test_cuda.py tests/test_im2win.py tests/test_monarch.py tests/test_measure.py >"$out/tests.log" 2>&1; echo "tests exit $?" >>"$out/tests.log") &
tests=$!
capped 120 im2win-precompile $py benchmarks/im2win.py --precompile 10 --precompile-only
wait $tests
tail -n 25 "$out/tests.log" >>"$log"

# Timed benchmarks: one at a time, nothing else running.
capped 70 monarch $py benchmarks/monarch.py --save
capped 140 im2win $py benchmarks/im2win.py --save
capped 30 rehash $py benchmarks/slicing.py --models "" --size 64 --frames 16 --rehash-channels 64,128,128 --out "$out/rehash"
capped 110 slicing $py benchmarks/slicing.py --skip-rehash --models animatediff,unet3d,svd --channels 64,128,128 \
  --size 64 --frames 16 --out benchmarks/results
capped 90 reversible $py benchmarks/reversible.py --depths 8,64 --lowering eager --budget-lowering inductor \
  --models reformer,revnet --variants eager,checkpoint,memopt-reversible,budget-0.1 \
  --output "benchmarks/results/reversible-$(date +%F)-cuda.md"
cp benchmarks/results/*-cuda.md "$out"/ 2>/dev/null
say "done"
