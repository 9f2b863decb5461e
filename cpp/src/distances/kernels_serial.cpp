// Portable scalar level: the fallback on every CPU and the oracle the SIMD levels are tested
// against. Compiled at the baseline instruction set with floating-point contraction off, so
// a * b + c is two roundings here, and exp / sqrt come from the C library.
#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

template <class Tp>
struct Scalar {
  using T = Tp;
  using R = Tp;
  static constexpr std::size_t W = 1, MR = 4, NRV = 2;
  static constexpr bool kLibm = true;
  static R zero() { return T(0); }
  static R set1(T x) { return x; }
  static R load(const T* p) { return *p; }
  static void store(T* p, R v) { *p = v; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R max(R a, R b) { return a > b ? a : b; }
  static R min(R a, R b) { return a < b ? a : b; }
  static R sqrt(R a) {
    if constexpr (sizeof(T) == 4) return __builtin_sqrtf(a);
    else return __builtin_sqrt(a);
  }
  static R exp(R a) {
    if constexpr (sizeof(T) == 4) return __builtin_expf(a);
    else return __builtin_exp(a);
  }
  static R exp2i(R) { return T(0); }  // unused: kLibm
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kSerial = make_kernels<Scalar<float>, Scalar<double>>();
}
