#!/usr/bin/env bash
# Build and run the standalone C++ kernel test (cpp/tests/test_kernels.cpp) without Python:
#   * natively (x86-64: serial + AVX2 + AVX-512 compiled in, run at every level this CPU has;
#     arm64: serial + NEON);
#   * cross-compiled for arm64 and run under qemu-aarch64 (serial + NEON), when
#     aarch64-linux-gnu-g++ and qemu-aarch64 are installed, or always with --neon (then their
#     absence is an error). Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu qemu-user
#
# Usage: tools/test-native.sh [--neon | --no-neon] [--no-native]
#   --neon         require the arm64/qemu run (fail if the toolchain is missing)
#   --no-neon      skip the arm64/qemu run
#   --no-native    skip the native run
# Env: CXX (native compiler, default g++), AARCH64_CXX (default aarch64-linux-gnu-g++),
#      QEMU_AARCH64 (default qemu-aarch64), BUILD_DIR (default build/kernel-test).
# Exit status: non-zero if any build or any level fails.
set -euo pipefail
cd "$(dirname "$0")/.."

neon=auto
native=1
for arg in "$@"; do
  case "$arg" in
    --neon) neon=yes ;;
    --no-neon) neon=no ;;
    --no-native) native=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

CXX=${CXX:-g++}
AARCH64_CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
QEMU_AARCH64=${QEMU_AARCH64:-qemu-aarch64}
BUILD_DIR=${BUILD_DIR:-build/kernel-test}
mkdir -p "$BUILD_DIR"
rm -f "$BUILD_DIR/native/test.log" "$BUILD_DIR/aarch64/test.log"

# Same floating-point settings as CMakeLists.txt: no contraction (the serial level is a plain
# two-rounding reference), no fast-math. No OpenMP: the kernels are single-threaded and the
# driver's pragmas are ignored (-Wno-unknown-pragmas).
COMMON=(-std=c++17 -O2 -ffp-contract=off -fno-math-errno -Icpp/include -Wall -Wextra -Wno-unknown-pragmas)
KSRC=cpp/src/combine
SHARED_SRCS=(cpp/tests/test_kernels.cpp cpp/src/common/isa.cpp "$KSRC/driver.cpp" "$KSRC/kernels_serial.cpp")
summary=()
secs() { local ms=$(( ($2 - $1) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
status=0

compile() {  # compile <cxx> <obj> <src> [flags...]
  local cxx=$1 obj=$2 src=$3; shift 3
  "$cxx" "${COMMON[@]}" "$@" -c "$src" -o "$obj"
}

run_native() {
  local arch out="$BUILD_DIR/native" objs=() defs=() base=()
  arch=$(uname -m)
  mkdir -p "$out"
  case "$arch" in
    x86_64|amd64)
      defs=(-DMETALORA_HAVE_AVX2 -DMETALORA_HAVE_AVX512)
      base=(-march=x86-64 -mtune=generic)
      compile "$CXX" "$out/kernels_avx2.o" "$KSRC/kernels_avx2.cpp" "${defs[@]}" "${base[@]}" -mavx2 -mfma -mf16c
      compile "$CXX" "$out/kernels_avx512.o" "$KSRC/kernels_avx512.cpp" "${defs[@]}" "${base[@]}" \
        -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c \
        -Wno-maybe-uninitialized  # GCC 12 false positive inside avx512fintrin.h (GCC PR 105593)
      objs+=("$out/kernels_avx2.o" "$out/kernels_avx512.o")
      ;;
    aarch64|arm64)
      defs=(-DMETALORA_HAVE_NEON)
      compile "$CXX" "$out/kernels_neon.o" "$KSRC/kernels_neon.cpp" "${defs[@]}"
      objs+=("$out/kernels_neon.o")
      ;;
    *) echo "note: no SIMD level for $arch; testing the serial level only" ;;
  esac
  for src in "${SHARED_SRCS[@]}"; do
    local o="$out/$(basename "${src%.cpp}").o"
    compile "$CXX" "$o" "$src" "${defs[@]}" "${base[@]}"
    objs+=("$o")
  done
  "$CXX" "${objs[@]}" -o "$out/test_kernels"
  echo "== native ($arch, $("$CXX" --version | head -1)): $out/test_kernels"
  local log="$out/test.log" t0 t1
  t0=$(date +%s%N)
  if "$out/test_kernels" | tee "$log"; then :; else status=1; fi
  t1=$(date +%s%N)
  summary+=("native $arch: $(grep -E '^\[' "$log" | sed -E 's/^\[([a-z0-9]+)\] ([A-Z]+).*/\1=\2/' | tr '\n' ' ')($(secs "$t0" "$t1") s)")
}

run_neon() {
  local out="$BUILD_DIR/aarch64" objs=() defs=(-DMETALORA_HAVE_NEON)
  mkdir -p "$out"
  # armv8-a baseline (what every arm64 CPU has; NEON is part of it). -static: qemu-aarch64
  # then needs no aarch64 sysroot (no -L /usr/aarch64-linux-gnu).
  local base=(-march=armv8-a)
  compile "$AARCH64_CXX" "$out/kernels_neon.o" "$KSRC/kernels_neon.cpp" "${defs[@]}" "${base[@]}"
  objs+=("$out/kernels_neon.o")
  for src in "${SHARED_SRCS[@]}"; do
    local o="$out/$(basename "${src%.cpp}").o"
    compile "$AARCH64_CXX" "$o" "$src" "${defs[@]}" "${base[@]}"
    objs+=("$o")
  done
  "$AARCH64_CXX" -static "${objs[@]}" -o "$out/test_kernels"
  echo "== arm64 under $("$QEMU_AARCH64" --version | head -1) ($("$AARCH64_CXX" --version | head -1)): $out/test_kernels"
  local log="$out/test.log" t0 t1
  t0=$(date +%s%N)
  if "$QEMU_AARCH64" "$out/test_kernels" | tee "$log"; then :; else status=1; fi
  t1=$(date +%s%N)
  summary+=("arm64 (qemu-aarch64): $(grep -E '^\[' "$log" | sed -E 's/^\[([a-z0-9]+)\] ([A-Z]+).*/\1=\2/' | tr '\n' ' ')($(secs "$t0" "$t1") s)")
}

if [ "$native" = 1 ]; then run_native; fi

have_cross=1
command -v "$AARCH64_CXX" >/dev/null 2>&1 || have_cross=0
command -v "$QEMU_AARCH64" >/dev/null 2>&1 || have_cross=0
case "$neon" in
  yes)
    if [ "$have_cross" = 0 ]; then
      echo "error: --neon needs $AARCH64_CXX and $QEMU_AARCH64 (apt-get install g++-aarch64-linux-gnu qemu-user)" >&2
      exit 1
    fi
    run_neon ;;
  auto)
    if [ "$have_cross" = 1 ]; then run_neon
    else summary+=("arm64: NOT RUN ($AARCH64_CXX or $QEMU_AARCH64 missing; apt-get install g++-aarch64-linux-gnu qemu-user)"); fi ;;
  no) summary+=("arm64: skipped (--no-neon)") ;;
esac

# Bit-level agreement across levels and machines (informational; the pass/fail above is the
# tolerance check). Inputs are identical everywhere, so equal digests mean equal output bits.
digests() {  # lines "where level digest" from the logs that exist
  local f where
  for f in "$BUILD_DIR/native/test.log" "$BUILD_DIR/aarch64/test.log"; do
    [ -f "$f" ] || continue
    case "$f" in */native/*) where="native-$(uname -m)" ;; *) where=arm64-qemu ;; esac
    sed -nE "s/^\[([a-z0-9]+)\] PASS: .*output digest ([0-9a-f]+)$/$where \1 \2/p" "$f"
  done
}
echo
echo "== summary: levels verified"
for s in "${summary[@]}"; do echo "  $s"; done
if [ -n "$(digests)" ]; then
  echo "  output digests (equal = bit-identical results):"
  digests | sort -k3 | awk '{ g[$3] = g[$3] " " $1 ":" $2 } END { for (d in g) print "    " d ":" g[d] }' | sort
fi
if [ "$status" = 0 ]; then echo "  result: all levels run passed"; else echo "  result: FAILURES (see above)"; fi
exit "$status"
