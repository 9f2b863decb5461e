// AVX-512 (F + BW + VL + DQ) level: Skylake-SP and later, Zen 4 and later. This file alone is
// compiled with the AVX-512 flags; it is only called after the CPU and OS were checked.
#include <immintrin.h>

#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"

namespace {

struct Avx512 {
  static constexpr std::size_t W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F load_bf16(const unsigned short* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const unsigned short* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static constexpr std::size_t WD = 8;
  using D = __m512d;
  static D dzero() { return _mm512_setzero_pd(); }
  static D dset1(double x) { return _mm512_set1_pd(x); }
  static D dload(const double* p) { return _mm512_loadu_pd(p); }
  static void dstore(double* p, D v) { _mm512_storeu_pd(p, v); }
  static D dfma(D a, D b, D c) { return _mm512_fmadd_pd(a, b, c); }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kAvx512 = make_kernels<Avx512>();
}
