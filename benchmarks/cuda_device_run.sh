#!/usr/bin/env bash
# One call on a GPU machine, from the repository root: build libpumice_cuda, run the CUDA tests,
# run the benchmark. Everything it reports lands in $OUT (default /tmp/pumice-cuda-out).
#
#   benchmarks/cuda_device_run.sh [all|build|test|bench] [extra bench_cuda.py arguments]
#   benchmarks/cuda_device_run.sh ab --libs DIR... [extra step_ab.py arguments]
#       step times (batch 1, or 16 with --batch 16) of several prebuilt library folders,
#       alternating processes
#   benchmarks/cuda_device_run.sh profiler-effect [extra profiler_effect.py arguments]
#       step times before and after a kernel profile in one process
#   benchmarks/cuda_device_run.sh profile [extra profile_gemv.py arguments]
#       Nsight Compute on the GEMV launches of a 2-layer model (NCU_ARGS to override the
#       sections, launch counts or kernel filter); the report text lands in $OUT/ncu.txt
#
# Environment:
#   OUT              where logs and bench_cuda.json go
#   PUMICE_PREBUILT  a folder holding libpumice.so and libpumice_cuda.so built elsewhere (for
#                    the same CPU family, PUMICE_NATIVE=OFF): skips the build
#   WHEELS           a folder of wheels to install first (cffi, pycparser) when missing
set -uo pipefail
ROOT=$(pwd)
OUT=${OUT:-/tmp/pumice-cuda-out}
mkdir -p "$OUT"
WHAT=${1:-all}
shift || true
export PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pumice-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/pumice-site:${PYTHONPATH:-}
fi

# The package from the source tree, laid out as installed (pumice/{runtime,format,...}).
PKG=/tmp/pumice-pkg
rm -rf "$PKG" && mkdir -p "$PKG/pumice/include"
for d in runtime format converter server; do ln -s "$ROOT/$d" "$PKG/pumice/$d"; done
cp runtime/package_root.py "$PKG/pumice/__init__.py"
cp csrc/include/pumice.h "$PKG/pumice/include/"
export PYTHONPATH=$PKG:${PYTHONPATH:-}

# cuBLAS (prefill GEMMs) is opened at run time; torch's copy is the one we know is there.
TORCH_LIBS=$(python3 -c 'import os, nvidia; print(":".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null)
export LD_LIBRARY_PATH=${TORCH_LIBS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

if [ -n "${PUMICE_PREBUILT:-}" ] && [ -f "$PUMICE_PREBUILT/libpumice_cuda.so" ]; then
    LIBDIR=$PUMICE_PREBUILT
    echo "using prebuilt libraries in $LIBDIR"
else
    t0=$(date +%s)
    cmake -S "$ROOT" -B /tmp/pumice-build -DPUMICE_CUDA=ON -DPUMICE_NATIVE=ON \
        -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
    cmake --build /tmp/pumice-build -j"$(nproc)" >> "$OUT/build.log" 2>&1
    rc=$?
    echo "build: rc=$rc in $(( $(date +%s) - t0 )) s"
    if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
    LIBDIR=/tmp/pumice-build
fi
export PUMICE_LIBRARY=$LIBDIR/libpumice.so
export PUMICE_CUDA_LIBRARY=$LIBDIR/libpumice_cuda.so

if [ "$WHAT" = all ] || [ "$WHAT" = test ]; then
    t0=$(date +%s)
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE --timeout 120 \
        ${CUDA_TESTS:-tests/test_cuda.py tests/test_cuda_persistent.py tests/test_cuda_bcq.py tests/test_cuda_caldera.py tests/test_native_sampling.py} \
        2>&1 | tee "$OUT/test_cuda.log" | tail -40
    echo "tests: $(( $(date +%s) - t0 )) s"
fi

if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
    PUMICE_VERBOSE=1 python3 benchmarks/bench_cuda.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi

if [ "$WHAT" = ab ]; then
    python3 benchmarks/step_ab.py "$@" 2>&1 | tee "$OUT/step_ab.log" | tail -30
fi

if [ "$WHAT" = profiler-effect ]; then
    python3 benchmarks/profiler_effect.py "$@" 2>&1 | tee "$OUT/profiler_effect.log" | tail -10
fi

if [ "$WHAT" = profile ]; then
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
    # shellcheck disable=SC2086
    "$NCU" ${NCU_ARGS:---kernel-name regex:gemv --launch-skip 18 --launch-count 9 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats} python3 benchmarks/profile_gemv.py "$@" > "$OUT/ncu.txt" 2>&1
    echo "ncu: rc=$?"
    grep -E "gemv_kernel|Duration|Memory Throughput|DRAM Throughput|L1/TEX Hit|L2 Hit|L1/TEX Cache Throughput|L2 Cache Throughput|Issued Ipc|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Eligible Warps|No Eligible" "$OUT/ncu.txt" | head -150
fi
