// AVX2 + FMA level (Haswell and later, Zen and later). This file alone is compiled with the AVX2
// flags; it is only called after the CPU and OS were checked.
#include <immintrin.h>

#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

struct Avx2F {
  using T = float;
  using R = __m256;
  static constexpr std::size_t W = 8, MR = 6, NRV = 2;
  static constexpr bool kLibm = false;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(T x) { return _mm256_set1_ps(x); }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static R exp(R a) { return a; }  // unused: !kLibm
  static R exp2i(R t) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
};

struct Avx2D {
  using T = double;
  using R = __m256d;
  static constexpr std::size_t W = 4, MR = 6, NRV = 2;
  static constexpr bool kLibm = false;
  static R zero() { return _mm256_setzero_pd(); }
  static R set1(T x) { return _mm256_set1_pd(x); }
  static R load(const T* p) { return _mm256_loadu_pd(p); }
  static void store(T* p, R v) { _mm256_storeu_pd(p, v); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R div(R a, R b) { return _mm256_div_pd(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static R min(R a, R b) { return _mm256_min_pd(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_pd(a); }
  static R exp(R a) { return a; }  // unused: !kLibm
  static R exp2i(R t) {
    const __m256i e = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023));
    return _mm256_castsi256_pd(_mm256_slli_epi64(e, 52));
  }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kAvx2 = make_kernels<Avx2F, Avx2D>();
}
