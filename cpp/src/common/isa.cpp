// CPU feature detection, done once at load time, and the active-level switch.
#include "metalora/isa.hpp"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace metalora {
namespace {

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kSerial:
      return true;
#if defined(__x86_64__)
    // __builtin_cpu_supports (GCC, Clang) also checks that the OS saves the wider register
    // state (XGETBV).
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__aarch64__)
    case Isa::kNeon:
      return true;  // Advanced SIMD (with fp16 conversions and float64 lanes) is mandatory on arm64.
#endif
    default:
      return false;
  }
}

Isa initial_isa() {
  Isa best = best_isa();
  if (const char* env = std::getenv("METALORA_ISA")) {
    Isa want;
    if (!isa_from_name(env, &want)) return best;  // reported by the Python layer
    for (Isa a : available_isas())
      if (a == want) return want;
  }
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kSerial: return "serial";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
  }
  return "unknown";
}

bool isa_from_name(const std::string& name, Isa* out) {
  for (Isa a : {Isa::kSerial, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (name == isa_name(a)) {
      *out = a;
      return true;
    }
  }
  return false;
}

std::vector<Isa> compiled_isas() {
  std::vector<Isa> v{Isa::kSerial};
#if defined(METALORA_HAVE_AVX2)
  v.push_back(Isa::kAvx2);
#endif
#if defined(METALORA_HAVE_AVX512)
  v.push_back(Isa::kAvx512);
#endif
#if defined(METALORA_HAVE_NEON)
  v.push_back(Isa::kNeon);
#endif
  return v;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> v;
  for (Isa a : compiled_isas())
    if (cpu_supports(a)) v.push_back(a);
  return v;
}

Isa best_isa() { return available_isas().back(); }

Isa active_isa() { return static_cast<Isa>(active_slot().load()); }

void set_active_isa(Isa isa) {
  for (Isa a : available_isas()) {
    if (a == isa) {
      active_slot().store(static_cast<int>(isa));
      return;
    }
  }
  throw std::invalid_argument(std::string("instruction-set level '") + isa_name(isa) +
                              "' is not available on this CPU or not compiled in");
}

}  // namespace metalora
