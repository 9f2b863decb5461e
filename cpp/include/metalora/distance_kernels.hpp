// Kernels of the distance family: one table per instruction-set level, each with a float32 and
// a float64 half.
//
// Every function works on a row range given by the caller and is single-threaded; the
// driver (cpp/src/distances/driver.cpp) cuts the work into ranges whose boundaries do not depend
// on the thread count, and every row is computed the same way in any range, so results are
// bit-identical for any number of threads.
//
// The serial table is the portable fallback and the reference the SIMD tables are tested
// against; it uses the C library's exp/log/sqrt, the SIMD tables a vectorised exp (< 2 ulp).
#pragma once
#include <cstddef>

#include "metalora/isa.hpp"

namespace metalora::distances {

// Kinds of the fused kernel-sum reduction (ksum).
enum KernelKind : int {
  kRbf = 0,         // k(D) = sum_q exp(-params[q] * D)          (params = gammas = 1 / (2 sigma^2))
  kMultiscale = 1,  // k(D) = sum_q params[q] / (params[q] + D)  (params = a^2)
  kSqrt = 2,        // k(D) = sqrt(max(D, 0))                    (energy distance)
};

template <class T>
struct KernelsT {
  // Columns per packed panel of Y (a multiple of the vector width).
  std::size_t nr;
  // Packs Y [m x d] (row stride ldy) into ceil(m / nr) panels of d x nr values (columns past m
  // are zero): Yp must hold packed_size(m, d) = ceil(m / nr) * nr * d values.
  void (*pack)(const T* Y, std::size_t ldy, std::size_t m, std::size_t d, T* Yp);
  // G[i * ldg + j] = max(lo, (alpha * <x_i, y_j> + xn[i]) + yn[j]) for i < n, j < m, with
  // X [n x d] row-major (stride ldx) and Y given packed. xn / yn may be null (= 0).
  void (*gram)(const T* X, std::size_t ldx, std::size_t n, const T* Yp, std::size_t m,
               std::size_t d, T alpha, const T* xn, const T* yn, T lo, T* G, std::size_t ldg);
  // out[i] = sum_k X[i * ldx + k]^2 for i < n.
  void (*sqnorm)(const T* X, std::size_t ldx, std::size_t n, std::size_t d, T* out);
  // Soft-min of rows (the log-domain Sinkhorn half-step):
  //   out[i] = -eps * log sum_{j < m} exp(h[j] - C[i * ldc + j] * inv_eps),  i < n.
  // C and h must be readable up to round_up(m, 16) columns; h is -inf past m.
  void (*softmin)(const T* C, std::size_t ldc, std::size_t n, std::size_t m, const T* h,
                  T inv_eps, double eps, double* out);
  // out[i] = sum_{j < m} k(D[i * ldd + j]) for i < n (kinds above; np parameters).
  void (*ksum)(const T* D, std::size_t ldd, std::size_t n, std::size_t m, int kind,
               const T* params, std::size_t np, double* out);
};

struct Kernels {
  KernelsT<float> f32;
  KernelsT<double> f64;
};

// kernels_for(isa), kernels() and the tables kSerial, kAvx2, kAvx512, kNeon.
#include "metalora/kernel_levels.hpp"

}  // namespace metalora::distances
