// AVX2 + FMA + F16C level (x86-64 since Haswell / Zen 1). This file alone is compiled with
// -mavx2 -mfma -mf16c; it is only called after the CPU was checked at run time.
#include <immintrin.h>

#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"

namespace {

struct Avx2 {
  static constexpr std::size_t W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F load_bf16(const unsigned short* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const unsigned short* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static constexpr std::size_t WD = 4;
  using D = __m256d;
  static D dzero() { return _mm256_setzero_pd(); }
  static D dset1(double x) { return _mm256_set1_pd(x); }
  static D dload(const double* p) { return _mm256_loadu_pd(p); }
  static void dstore(double* p, D v) { _mm256_storeu_pd(p, v); }
  static D dfma(D a, D b, D c) { return _mm256_fmadd_pd(a, b, c); }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kAvx2 = make_kernels<Avx2>();
}
