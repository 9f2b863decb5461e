// Kernels of the LoRA-combination family: one table per instruction-set level.
//
// Every function works on one contiguous range and is single-threaded; the driver
// (cpp/src/combine/driver.cpp) splits work into ranges whose boundaries do not depend on the
// thread count, so results are bit-identical for any number of threads.
//
// The serial table is both the portable fallback and the reference the SIMD tables are
// tested against.
#pragma once
#include <cstddef>

#include "metalora/dtype.hpp"
#include "metalora/isa.hpp"

namespace metalora::combine {

struct Kernels {
  // Linear combination of rows:
  //   out[k * ldo + i] = sum_p coef[k * nsrc + p] * widen(src[p][i]),  k < m, i < n.
  // The sum runs over p in increasing order, one rounding per term (FMA where the level has it).
  void (*rowmix)(const Src* src, std::size_t nsrc, const float* coef, std::size_t m,
                 std::size_t n, float* out, std::size_t ldo);
  // dst[i] = scale * widen(src[i]) in float32.
  void (*scale_to_f32)(Src src, float scale, std::size_t n, float* dst);
  // dst[i] = scale * widen(src[i]) in float64.
  void (*scale_to_f64)(Src src, double scale, std::size_t n, double* dst);
  // G[i * R + j] += sum_t X[t * R + i] * X[t * R + j] for j >= i - (i % 4) (at least the upper
  // triangle); X is n x R row-major float64.
  void (*syrk_f64)(const double* X, std::size_t n, std::size_t R, double* G);
  // Y[t * ldy + k] = float(sum_p X[t * R + p] * P[p * mp + k]) for k < m; P is R x mp row-major
  // float64 with mp >= m a multiple of 8 (zero padded).
  void (*gemm_f64)(const double* X, std::size_t n, std::size_t R, const double* P, std::size_t m,
                   std::size_t mp, float* Y, std::size_t ldy);
};

// kernels_for(isa), kernels() and the tables kSerial, kAvx2, kAvx512, kNeon.
#include "metalora/kernel_levels.hpp"

}  // namespace metalora::combine
