#!/usr/bin/env bash
# Build and run the standalone C++ kernel tests without Python, one binary per kernel family:
# cpp/tests/test_kernels.cpp (combine kernels) and cpp/tests/test_distance_kernels.cpp (distance
# kernels: GEMM pack/gram, sqnorm, Sinkhorn softmin, kernel sums ksum), each
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
#      QEMU_AARCH64 (default qemu-aarch64), BUILD_DIR (default build/kernel-test),
#      SANITIZE (e.g. address,undefined: build with -fsanitize=... and stop at the first report;
#      used by tools/test-sanitizers.sh).
# Prints which levels passed where, per family, and the output digests (equal digests =
# bit-identical results across levels and machines).
# Exit status: non-zero if any build or any level of either family fails.
set -euo pipefail
cd "$(dirname "$0")/.."

neon=auto
native=1
for arg in "$@"; do
  case "$arg" in
    --neon) neon=yes ;;
    --no-neon) neon=no ;;
    --no-native) native=0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

CXX=${CXX:-g++}
AARCH64_CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
QEMU_AARCH64=${QEMU_AARCH64:-qemu-aarch64}
BUILD_DIR=${BUILD_DIR:-build/kernel-test}
mkdir -p "$BUILD_DIR"
rm -f "$BUILD_DIR"/native/*.log "$BUILD_DIR"/aarch64/*.log

# Same floating-point settings as CMakeLists.txt: no contraction (the serial level is a plain
# two-rounding reference), no fast-math. The drivers run on the task pool (cpp/src/common/pool.cpp,
# std::thread: linked with -pthread).
COMMON=(-std=c++17 -O2 -ffp-contract=off -fno-math-errno -Icpp/include -Wall -Wextra -Wno-unknown-pragmas)
SANFLAGS=()
if [ -n "${SANITIZE:-}" ]; then
  SANFLAGS=(-fsanitize="$SANITIZE" -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
  COMMON+=("${SANFLAGS[@]}")
fi
# The two kernel families: name, test source, kernel directory. Each gets its own binary
# (build/kernel-test/<arch>/test_<name>) and log (<name>.log next to it).
FAMILIES=("combine cpp/tests/test_kernels.cpp cpp/src/combine"
          "distances cpp/tests/test_distance_kernels.cpp cpp/src/distances")
summary=()
secs() { local ms=$(( ($2 - $1) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
status=0

compile() {  # compile <cxx> <obj> <src> [flags...]
  local cxx=$1 obj=$2 src=$3; shift 3
  "$cxx" "${COMMON[@]}" "$@" -c "$src" -o "$obj"
}

# build_run <where-label> <cxx> <out-dir> <simd: "x86" | "neon" | ""> <link flags> <runner...>
# Builds and runs both families for one target; appends one summary line per family.
build_run() {
  local label=$1 cxx=$2 out=$3 simd=$4 ldflags=$5; shift 5
  local runner=("$@") defs=() base=()
  mkdir -p "$out"
  case "$simd" in
    x86) defs=(-DMETALORA_HAVE_AVX2 -DMETALORA_HAVE_AVX512); base=(-march=x86-64 -mtune=generic) ;;
    neon-cross) defs=(-DMETALORA_HAVE_NEON); base=(-march=armv8-a) ;;
    neon) defs=(-DMETALORA_HAVE_NEON) ;;
  esac
  compile "$cxx" "$out/isa.o" cpp/src/common/isa.cpp "${defs[@]}" "${base[@]}"
  compile "$cxx" "$out/pool.o" cpp/src/common/pool.cpp "${defs[@]}" "${base[@]}" -pthread
  local fam name tsrc ksrc
  for fam in "${FAMILIES[@]}"; do
    read -r name tsrc ksrc <<<"$fam"
    local o="$out/$name" objs=("$out/isa.o" "$out/pool.o")
    mkdir -p "$o"
    case "$simd" in
      x86)
        compile "$cxx" "$o/kernels_avx2.o" "$ksrc/kernels_avx2.cpp" "${defs[@]}" "${base[@]}" -mavx2 -mfma -mf16c
        compile "$cxx" "$o/kernels_avx512.o" "$ksrc/kernels_avx512.cpp" "${defs[@]}" "${base[@]}" \
          -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c \
          -Wno-maybe-uninitialized  # GCC 12 false positive inside avx512fintrin.h (GCC PR 105593)
        objs+=("$o/kernels_avx2.o" "$o/kernels_avx512.o") ;;
      neon|neon-cross)
        compile "$cxx" "$o/kernels_neon.o" "$ksrc/kernels_neon.cpp" "${defs[@]}" "${base[@]}"
        objs+=("$o/kernels_neon.o") ;;
    esac
    compile "$cxx" "$o/kernels_serial.o" "$ksrc/kernels_serial.cpp" "${defs[@]}" "${base[@]}"
    compile "$cxx" "$o/driver.o" "$ksrc/driver.cpp" "${defs[@]}" "${base[@]}" -pthread
    compile "$cxx" "$o/test.o" "$tsrc" "${defs[@]}" "${base[@]}"
    objs+=("$o/kernels_serial.o" "$o/driver.o" "$o/test.o")
    # shellcheck disable=SC2086
    "$cxx" $ldflags "${SANFLAGS[@]}" "${objs[@]}" -pthread -o "$out/test_$name"
    echo "== $label, $name kernels: $out/test_$name"
    local log="$out/$name.log" t0 t1
    t0=$(date +%s%N)
    if "${runner[@]}" "$out/test_$name" | tee "$log"; then :; else status=1; fi
    t1=$(date +%s%N)
    summary+=("$label, $name: $(grep -E '^\[' "$log" | sed -E 's/^\[([a-z0-9]+)\] ([A-Z]+).*/\1=\2/' | tr '\n' ' ')($(secs "$t0" "$t1") s)")
  done
}

run_native() {
  local arch simd=""
  arch=$(uname -m)
  case "$arch" in
    x86_64|amd64) simd=x86 ;;
    aarch64|arm64) simd=neon ;;
    *) echo "note: no SIMD level for $arch; testing the serial level only" ;;
  esac
  echo "== native ($arch, $("$CXX" --version | head -1))"
  build_run "native $arch" "$CXX" "$BUILD_DIR/native" "$simd" "" env
}

run_neon() {
  # armv8-a baseline (what every arm64 CPU has; NEON is part of it). -static: qemu-aarch64
  # then needs no aarch64 sysroot (no -L /usr/aarch64-linux-gnu).
  echo "== arm64 under $("$QEMU_AARCH64" --version | head -1) ($("$AARCH64_CXX" --version | head -1))"
  build_run "arm64 (qemu-aarch64)" "$AARCH64_CXX" "$BUILD_DIR/aarch64" neon-cross -static "$QEMU_AARCH64"
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
digests() {  # lines "where level digest" from the logs of family $1 that exist
  local f where
  for f in "$BUILD_DIR/native/$1.log" "$BUILD_DIR/aarch64/$1.log"; do
    [ -f "$f" ] || continue
    case "$f" in */native/*) where="native-$(uname -m)" ;; *) where=arm64-qemu ;; esac
    sed -nE "s/^\[([a-z0-9]+)\] PASS: .*output digest ([0-9a-f]+)$/$where \1 \2/p" "$f"
  done
}
echo
echo "== summary: levels verified"
for s in "${summary[@]}"; do echo "  $s"; done
for fam in "${FAMILIES[@]}"; do
  read -r name _ <<<"$fam"
  if [ -n "$(digests "$name")" ]; then
    echo "  $name output digests (equal = bit-identical results):"
    digests "$name" | sort -k3 | awk '{ g[$3] = g[$3] " " $1 ":" $2 } END { for (d in g) print "    " d ":" g[d] }' | sort
  fi
done
# The same per kernel (and dtype): levels whose width or accumulation order differ legitimately
# differ in the last bits of reductions, and pack's layout depends on the level's panel width,
# so the overall digests above can only match between levels of the same width.
kdigests() {  # lines "kernel|where:level|digest" from the logs of family $1 that exist
  local f where
  for f in "$BUILD_DIR/native/$1.log" "$BUILD_DIR/aarch64/$1.log"; do
    [ -f "$f" ] || continue
    case "$f" in */native/*) where="native-$(uname -m)" ;; *) where=arm64-qemu ;; esac
    awk -v w="$where" '/^\[[a-z0-9]+\] / { lv = substr($1, 2, length($1) - 2) }
      /^    [a-z].* worst err .* digest [0-9a-f]+$/ { k = $0; sub(/^ +/, "", k); sub(/ +worst err.*/, "", k)
        print k "|" w ":" lv "|" $NF }' "$f"
  done
}
for fam in "${FAMILIES[@]}"; do
  read -r name _ <<<"$fam"
  if [ -n "$(kdigests "$name")" ]; then
    echo "  $name per-kernel digests, levels grouped by identical output bits:"
    kdigests "$name" | sort -t'|' -k1,1 -k3,3 -k2,2 | awk -F'|' '
      $1 != k { if (k != "") print line "}"; k = $1; d = $3; line = sprintf("    %-20s {%s", k, $2); next }
      $3 != d { line = line "} {" $2; d = $3; next }
      { line = line " " $2 }
      END { if (k != "") print line "}" }'
  fi
done
if [ "$status" = 0 ]; then echo "  result: all levels run passed"; else echo "  result: FAILURES (see above)"; fi
exit "$status"
