// Portable scalar level: the fallback on every CPU and the oracle the SIMD levels are tested
// against. Compiled at the baseline instruction set with floating-point contraction off, so
// a * b + c is two roundings here.
#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"
#include "metalora/half.hpp"

namespace {

struct Scalar {
  static constexpr std::size_t W = 1;
  using F = float;
  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F load_bf16(const unsigned short* p) { return metalora::bf16_to_f32(*p); }
  static F load_f16(const unsigned short* p) { return metalora::f16_to_f32(*p); }
  static F fma(F a, F b, F c) { return a * b + c; }
  static constexpr std::size_t WD = 1;
  using D = double;
  static D dzero() { return 0.0; }
  static D dset1(double x) { return x; }
  static D dload(const double* p) { return *p; }
  static void dstore(double* p, D v) { *p = v; }
  static D dfma(D a, D b, D c) { return a * b + c; }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kSerial = make_kernels<Scalar>();
}
