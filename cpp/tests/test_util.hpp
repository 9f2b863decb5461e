// Helpers shared by the standalone C++ kernel tests (test_kernels.cpp: combine kernels,
// test_distance_kernels.cpp: distance kernels): the deterministic input generator, the per
// kernel statistics and digests, the per level context, guarded output buffers, formatting
// and the per level report. Each test is built as one translation unit that includes this
// header (see tools/test-native.sh), so everything here is inline or a template.
//
// The generator's sequence is part of both tests' expected results (the digests they print
// are compared across levels and machines): changing Rng changes every digest.
#pragma once

#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "metalora/isa.hpp"

namespace metalora_test {

using std::size_t;

constexpr double kU32 = 5.9604644775390625e-08;  // 2^-24, unit roundoff of float32
constexpr double kU64 = 1.1102230246251565e-16;  // 2^-53, unit roundoff of float64

// ----- deterministic random numbers ----------------------------------------------------------
// Every draw is its own statement (argument evaluation order is unspecified), so all platforms
// (x86-64, arm64) get the same inputs.
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed) {}
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  // Sign * mantissa in [1, 2) * 2^e with e spread over [-8, 3]: many binades, no zeros.
  double value() {
    const double m = 1.0 + uniform();
    const int e = static_cast<int>(next() % 12) - 8;
    const double v = std::ldexp(m, e);
    return (next() & 1) ? -v : v;
  }
  // The same draw rounded to float32 (exact: at most 53 significant bits rounded once).
  float value_f32() { return static_cast<float>(value()); }
  // A T value with full-width mantissa (float64: more than 24 significant bits).
  template <class T> T val() {
    const double a = value();
    const double b = uniform();
    return static_cast<T>(a * (1.0 + b));
  }
  double range(double lo, double hi) { return lo + (hi - lo) * uniform(); }
};

// ----- bookkeeping ---------------------------------------------------------------------------
// Per kernel (and dtype) statistics, in units of the kernel's bound's u times its scale.
struct Stat {
  std::string name;
  double worst = 0.0;      // max |err| / (u * scale): error in units of the bound's u
  double worst_tol = 0.0;  // max |err| / tol (must be <= 1)
  double worst_xlev = 0.0; // max |level - serial| / (u * scale)
  long checks = 0;
  std::uint64_t digest = 0xcbf29ce484222325ull;  // FNV-1a over the bits of every output mixed in
  template <class T> void mix(T v) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    for (unsigned char x : b) digest = (digest ^ x) * 0x100000001b3ull;
  }
};

// One level under test: its kernel table K, the serial level's, the failures and the stats.
// At most kMaxReported failures are printed (all are counted).
template <class K, long kMaxReported>
struct Ctx {
  metalora::Isa isa;
  const K* k;
  const K* serial;
  long failures = 0;
  std::vector<Stat> stats;
  Stat& stat(const std::string& name) {
    for (auto& s : stats)
      if (s.name == name) return s;
    stats.push_back(Stat{name});
    return stats.back();
  }
  void fail(const std::string& what) {
    if (failures < kMaxReported) std::printf("  FAIL [%s] %s\n", metalora::isa_name(isa), what.c_str());
    ++failures;
  }
};

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char b[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(b, sizeof b, f, ap);
  va_end(ap);
  return b;
}

template <class T> bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

inline size_t round_up(size_t x, size_t k) { return (x + k - 1) / k * k; }

// ----- guarded output buffers ----------------------------------------------------------------
// Output buffer with guard cells on both sides, filled with a NaN pattern.
constexpr size_t kGuard = 24;
template <class T> T guard_value() {
  if constexpr (sizeof(T) == 4) {
    const std::uint32_t b = 0x7fbadbadu;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  } else {
    const std::uint64_t b = 0x7ff4badbadbadbadull;
    double f;
    std::memcpy(&f, &b, 8);
    return f;
  }
}
template <class T> struct Out {
  std::vector<T> buf;
  explicit Out(size_t n) : buf(n + 2 * kGuard, guard_value<T>()) {}
  T* data() { return buf.data() + kGuard; }
  const T* data() const { return buf.data() + kGuard; }
  bool untouched(size_t i) const { return same_bits(data()[i], guard_value<T>()); }
  bool guards_ok(size_t n) const {  // nothing written outside [0, n)
    for (size_t i = 0; i < buf.size(); ++i) {
      if (i >= kGuard && i < kGuard + n) continue;
      if (!same_bits(buf[i], guard_value<T>())) return false;
    }
    return true;
  }
  // For a matrix of `rows` rows of `cols` cells with leading dimension ld >= cols: nothing
  // written in the gaps between rows (cells cols..ld-1 of every row but the last).
  bool gaps_ok(size_t rows, size_t cols, size_t ld) const {
    for (size_t r = 0; r + 1 < rows; ++r)
      for (size_t j = cols; j < ld; ++j)
        if (!untouched(r * ld + j)) return false;
    return true;
  }
};

// ----- report --------------------------------------------------------------------------------
// "<title>: compiled levels: ...; available here: ..."
inline void print_levels(const char* title) {
  std::printf("%s: compiled levels:", title);
  for (metalora::Isa a : metalora::compiled_isas()) std::printf(" %s", metalora::isa_name(a));
  std::printf("; available here:");
  for (metalora::Isa a : metalora::available_isas()) std::printf(" %s", metalora::isa_name(a));
  std::printf("\n");
}

// One level's summary line "[level] PASS|FAIL: ... output digest D" (D combines the stats'
// digests in order), then a line per stat (tools/test-native.sh parses both).
template <class C> void print_level_report(const C& c, int name_width, int err_width) {
  long checks = 0;
  std::uint64_t all = 0;
  for (const auto& s : c.stats) {
    checks += s.checks;
    all = all * 0x100000001b3ull ^ s.digest;
  }
  std::printf("[%s] %s: %ld checks, %ld failures, output digest %016" PRIx64 "\n",
              metalora::isa_name(c.isa), c.failures ? "FAIL" : "PASS", checks, c.failures, all);
  for (const auto& s : c.stats)
    std::printf("    %-*s worst err %*.3f u (%.3f of tol), vs serial %*.3f u, digest %016" PRIx64 "\n",
                name_width, s.name.c_str(), err_width, s.worst, s.worst_tol, err_width, s.worst_xlev,
                s.digest);
}

// "[level] SKIPPED" for each level compiled in but not supported by this CPU.
inline void print_skipped_levels() {
  for (metalora::Isa a : metalora::compiled_isas()) {
    bool avail = false;
    for (metalora::Isa b : metalora::available_isas()) avail |= a == b;
    if (!avail) std::printf("[%s] SKIPPED: compiled in but not supported by this CPU\n", metalora::isa_name(a));
  }
}

}  // namespace metalora_test
