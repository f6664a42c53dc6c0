#!/usr/bin/env bash
# One device-machine session: install, restore compile caches, run the named steps, save caches.
#
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_run.sh STEP [STEP ...]
#   probe      versions and which custom-call target jaxlib offers
#   tests      pytest -m gpu (kernels and torch_compat bridge)
#   launch     benchmarks/bench_launch.py with and without XLA command buffers (launch-cb: with only)
#   e2e        benchmarks/bench_e2e.py (E2E_ARGS overrides its arguments)
#   tune       benchmarks/tune_4bit_tiles.py --planned (TUNE_ARGS)
#   torch-tests  pytest -m gpu tests/torch_compat_kernels (torch_compat's direct kernel path)
#   overhead   benchmarks/bench_overhead.py --device cuda (one small LinearNF4 call)
#   generate   benchmarks/bench_torch_generate.py (GEN_ARGS overrides its arguments)
#   tune-int8  benchmarks/tune_int8_tiles.py (TUNE_INT8_ARGS)
#   profile-gen  benchmarks/profile_torch_generate.py (PROFILE_ARGS): host-time table of eager decode
#   int8       benchmarks/bench_int8.py (INT8_ARGS, default --parts gemm,llm --gemm-sizes big --quick)
#   int8-xla   the int8 GPU tests with every launch forced through XLA's Triton pipeline (INT8_XLA_K: -k filter)
# Wheels in .whl/ are installed to /tmp/site (jax-triton for the launch baseline, bitsandbytes).
# Compile caches (Triton's and JAX's) travel as .cache/kernels.tar.gz and come back in $OUT.
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
mkdir -p /tmp/cache/triton /tmp/cache/jax
[ -f .cache/kernels.tar.gz ] && tar xzf .cache/kernels.tar.gz -C /tmp/cache
export TRITON_CACHE_DIR=/tmp/cache/triton
status=0
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    probe)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
      python3 - <<'PY'
import jax, jaxlib, triton
from qflax_kernels import triton_call
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "triton", triton.__version__, jax.devices())
print("ffi target:", triton_call.ffi_target_available(), "->", triton_call.custom_call_target())
PY
      ;;
    tests)
      # The bridge tests' conftest imports bitsandbytes (the oracle): without its wheel in .whl/ they
      # cannot even be collected, so the kernel tests run alone.
      bridge=tests/torch_compat/test_bridge.py
      python3 -c "import bitsandbytes" 2>/dev/null || { echo "no bitsandbytes: $bridge not run"; bridge=; }
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout 300 python3 -m pytest -m gpu -q -n 8 -p no:cacheprovider \
        tests/kernels $bridge 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1
      ;;
    launch|launch-cb)
      (cd benchmarks && timeout 150 python3 bench_launch.py --out "$OUT/launch.json" 2>&1 | tail -25)
      [ "$step" = launch-cb ] && continue
      (cd benchmarks && XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 bench_launch.py \
        --tag no-command-buffers --out "$OUT/launch_nocb.json" 2>&1 | tail -20)
      ;;
    e2e)
      (cd benchmarks && timeout 560 python3 bench_e2e.py ${E2E_ARGS:---kinds bf16,nf4_dq,nf4,int8_t0 --rows 1,16} \
        --out "$OUT/e2e${E2E_TAG:-}.json" 2>&1 | grep -v Warning | tail -40)
      ;;
    tune)
      (cd benchmarks && timeout 400 python3 tune_4bit_tiles.py ${TUNE_ARGS:---planned} --out "$OUT/tune.json" 2>&1 | tail -40)
      ;;
    torch-tests)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout 300 python3 -m pytest -m gpu -q -n 4 -p no:cacheprovider \
        tests/torch_compat_kernels 2>&1 | tee "$OUT/torch_gpu_tests.log" | tail -25 || status=1
      ;;
    overhead)
      timeout 150 python3 benchmarks/bench_overhead.py --device cuda --out "$OUT" 2>&1 | grep -v Warning | tail -8
      ;;
    generate)
      timeout 540 python3 benchmarks/bench_torch_generate.py ${GEN_ARGS:-} --out "$OUT/torch_generate.json" 2>&1 \
        | grep -v Warning | tail -30
      ;;
    tune-int8)
      (cd benchmarks && timeout 400 python3 tune_int8_tiles.py ${TUNE_INT8_ARGS:-} --out "$OUT/tune_int8.json" 2>&1 \
        | grep -v Warning | tail -${TUNE_TAIL:-80})
      ;;
    profile-gen)
      timeout 300 python3 benchmarks/profile_torch_generate.py ${PROFILE_ARGS:-} > "$OUT/profile_gen.txt" 2>&1
      grep -E "===|sync marker" "$OUT/profile_gen.txt"
      ;;
    int8)
      timeout 560 python3 benchmarks/bench_int8.py ${INT8_ARGS:---parts gemm,llm --gemm-sizes big --quick} \
        --out "$OUT" 2>&1 | grep -v Warning | tail -${INT8_TAIL:-40}
      ;;
    int8-xla)
      QFLAX_TRITON_CUSTOM_CALL=xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.1 timeout 240 python3 -m pytest -m gpu -q -n 4 \
        -p no:cacheprovider tests/kernels/test_int8_gpu.py -k "${INT8_XLA_K:-not nothing}" -rf 2>&1 \
        | tee "$OUT/int8_xla_tests.log" | tail -25
      ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
tar czf "$OUT/cache.tar.gz" -C /tmp/cache triton 2>/dev/null  # JAX's cache is too large to bring back
ls -la "$OUT"
exit $status
