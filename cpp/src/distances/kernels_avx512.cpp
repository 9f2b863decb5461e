// AVX-512 (F + BW + VL + DQ) level: Skylake-SP and later, Zen 4 and later. This file alone is
// compiled with the AVX-512 flags; it is only called after the CPU and OS were checked.
#include <immintrin.h>

#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

struct Avx512F {
  using T = float;
  using R = __m512;
  static constexpr std::size_t W = 16, MR = 12, NRV = 2;
  static constexpr bool kLibm = false;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(T x) { return _mm512_set1_ps(x); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R sqrt(R a) { return _mm512_sqrt_ps(a); }
  static R exp(R a) { return a; }  // unused: !kLibm
  static R exp2i(R t) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
};

struct Avx512D {
  using T = double;
  using R = __m512d;
  static constexpr std::size_t W = 8, MR = 12, NRV = 2;
  static constexpr bool kLibm = false;
  static R zero() { return _mm512_setzero_pd(); }
  static R set1(T x) { return _mm512_set1_pd(x); }
  static R load(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, R v) { _mm512_storeu_pd(p, v); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R div(R a, R b) { return _mm512_div_pd(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static R min(R a, R b) { return _mm512_min_pd(a, b); }
  static R sqrt(R a) { return _mm512_sqrt_pd(a); }
  static R exp(R a) { return a; }  // unused: !kLibm
  static R exp2i(R t) {
    const __m512i e = _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023));
    return _mm512_castsi512_pd(_mm512_slli_epi64(e, 52));
  }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kAvx512 = make_kernels<Avx512F, Avx512D>();
}
