#!/usr/bin/env bash
# What a borrowed GPU is for, in as few calls as possible: install, the test modules that
# exercise the GPU, and the benchmarks of each issue. Each step runs under its own time cap
# so one slow step cannot eat the others' time; the combined log (run.log) and the result
# tables land in OUT_DIR.
#
#   benchmarks/gpu_session.sh OUT_DIR [STEP ...]
#
# STEPs, in the order given: tests, monarch, im2win, rehash (the default set: its caps add up
# to about 7.5 minutes, under one 10-minute call), reversible (6 minutes: Inductor compiles
# each variant, so depths 8 and 16 only; with profile, one call of its own), profile (host
# vs GPU time and kernels per call of the Monarch op and the reversible step, 2 minutes),
# draws (dropout in a chain from RNG states or seeds, by op size, 4 minutes), reversible-unet
# (training a converted diffusers UNet3D, 5 minutes; needs diffusers),
# and slicing (give it a call of
# its own: on an H100 Inductor's cold compile of the small AnimateDiff UNet alone took 54 s, and
# memopt adds one compile per multi-op group). Expects the GPU machine's Python with torch and
# triton installed (nothing is downloaded); diffusers, which rehash and slicing need, is
# installed from wheels in .whl/ when present (carry .whl). Tests print one line each, so a
# cap that stops them still shows which ran.
set -u
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [tests|monarch|im2win|rehash|reversible|reversible-unet|draws|profile|slicing ...]}
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests monarch im2win rehash)
mkdir -p "$out"
log=$out/run.log
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
date=$(date +%F)

say() { echo "== $(date +%T) $*" | tee -a "$log"; }
capped() {  # capped SECONDS NAME COMMAND...: run, log, report exit status and duration
  local cap=$1 name=$2 begin=$SECONDS
  shift 2
  say "$name: start (cap ${cap}s)"
  timeout -k 5 "$cap" "$@" >>"$log" 2>&1
  say "$name: exit $? after $((SECONDS - begin))s"
}

say "machine; steps: ${steps[*]}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } >>"$log" 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
capped 90 install $py -m pip install -q --no-deps --no-build-isolation -e .
$py -c "import torch, triton, memopt; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$log" 2>&1
# Which of the Inductor CPU bugs memopt fixes this PyTorch has (README).
$py -c "from memopt._torch_compat import inductor_fixes_key as key; print('inductor fixes:', key())" \
  >>"$log" 2>&1

# Caps in seconds, each overridable from the environment (CAP_SLICING=300 ...), so that one call
# can hold several steps when the lease is short; MONARCH_ARGS, IM2WIN_ARGS, REVERSIBLE_ARGS,
# REVERSIBLE_UNET_ARGS, SLICING_ARGS and PROFILE_ARGS add arguments to those benchmarks
# (REVERSIBLE_ARGS="--dropout 0.1", PROFILE_ARGS="--parts reversible --dropout 0.1": chains whose
# dropout draws from Inductor's seeds; REVERSIBLE_UNET_ARGS="--dropout 0.1": nested chains with
# random steps), TEST_FILES picks the tests.
cap() { local var=CAP_$1; echo "${!var:-$2}"; }
for step in "${steps[@]}"; do
  case $step in
    tests)
      # Correctness only, nothing timed: overlaps the compilation of im2win's kernels.
      say "tests: start in background"
      (timeout -k 5 "$(cap TESTS 150)" $py -m pytest -v -p no:cacheprovider -n 8 --tb=short -rfE \
        ${TEST_FILES:-tests/test_cuda.py tests/test_im2win.py tests/test_monarch.py tests/test_measure.py} \
        >"$out/tests.log" 2>&1
       echo "tests exit $?" >>"$out/tests.log") &
      tests=$!
      [ -n "${SKIP_PRECOMPILE:-}" ] || capped 120 im2win-precompile $py benchmarks/im2win.py --precompile 8 --precompile-only
      wait $tests
      tail -n 40 "$out/tests.log" >>"$log" ;;
    monarch) capped "$(cap MONARCH 60)" monarch $py benchmarks/monarch.py --save ${MONARCH_ARGS:-} ;;
    im2win) capped "$(cap IM2WIN 90)" im2win $py benchmarks/im2win.py --save ${IM2WIN_ARGS:-} ;;
    rehash)
      capped "$(cap REHASH 50)" rehash $py benchmarks/slicing.py --models "" --size 64 --frames 16 \
        --rehash-channels 64,128,128 --out "$out/rehash" ;;
    reversible)
      # Inductor lowering: chains traced into the graphs (memopt-reversible) and, for
      # comparison, run as opaque ops step by step (memopt-reversible-op).
      capped "$(cap REVERSIBLE 360)" reversible $py benchmarks/reversible.py --depths "${REVERSIBLE_DEPTHS:-8,16}" \
        --lowering inductor --models reformer,revnet --repeat 5 \
        --variants "${REVERSIBLE_VARIANTS:-eager,inductor,memopt-reversible,memopt-reversible-op,inductor-cudagraphs,memopt-reversible-cudagraphs}" \
        --output "benchmarks/results/reversible-$date-cuda.md" ${REVERSIBLE_ARGS:-} ;;
    draws)
      # Dropout in a traced chain: random ops drawn from RNG states or Inductor's seeds (a GPU's
      # default) at a launch-bound, a middle and the benchmark's size; three compiles a shape.
      capped "$(cap DRAWS 240)" draws $py benchmarks/reversible.py --lowering inductor --depths 8 --repeat 10 \
        --draw-sweep "${DRAW_SHAPES:-1x2x4,4x16x32,32x64x32}" --output "$out/draws-$date-cuda.md" ;;
    reversible-unet)
      # Training a converted diffusers UNet3D: Inductor, eager, per-block checkpointing, memopt.
      # Each compiled variant is a cold compile of a training UNet: three by default.
      capped "$(cap REVERSIBLE_UNET 300)" reversible-unet $py benchmarks/reversible_unet.py --channels 64,128,128 \
        --frames 16 --size 32 --variants "${REVERSIBLE_UNET_VARIANTS:-inductor,eager,memopt-convert}" \
        --output "$out/reversible-unet-$date-cuda.md" ${REVERSIBLE_UNET_ARGS:-} ;;
    profile)
      # Host vs GPU time and kernels per call: the Monarch op against its kernels, memopt's
      # reversible training step against eager's (benchmarks/gpu_profile.py).
      capped "$(cap PROFILE 120)" profile $py benchmarks/gpu_profile.py --output "$out/profile-$date-cuda.md" \
        ${PROFILE_ARGS:-} ;;
    slicing)
      # Also replayed as CUDA graphs: the sliced groups' per-slice Python is what costs time.
      capped "$(cap SLICING 540)" slicing $py benchmarks/slicing.py --skip-rehash --cudagraphs \
        --models "${SLICING_MODELS:-animatediff,svd,unet3d}" --channels 64,128,128 --size 64 --frames 16 \
        --out benchmarks/results ${SLICING_ARGS:-} ;;
    *) say "unknown step '$step' (valid: tests monarch im2win rehash reversible reversible-unet draws profile slicing)" ;;
  esac
done
cp benchmarks/results/*-"$date"-cuda.md "$out"/ 2>/dev/null
say "done"
