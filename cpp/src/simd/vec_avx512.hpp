// Vector traits of the AVX-512 (F + BW + VL + DQ) level, shared by every kernel family (combine,
// distances).
//
// Included by the family's kernels_avx512.cpp INSIDE its anonymous namespace (so every kernel
// instantiated over these traits has internal linkage and no AVX-512 code can be picked by the
// linker for a baseline caller), after that file has included <immintrin.h> and the standard
// headers: this header includes nothing itself.
//
// VecF32 / VecF64 provide: T (lane type), R (register), W (lanes), kLibm, zero, set1, load, store,
// add, sub, mul, div, fma (one rounding), max, min, sqrt, exp2i(t) = 2^(bits(t)) for the
// distances' vectorised exp (kLibm = false: no exp of their own); VecF32 also load_bf16 /
// load_f16 (W 16-bit floats widened to float32).
#pragma once

struct VecF32 {
  using T = float;
  using R = __m512;
  static constexpr std::size_t W = 16;
  static constexpr bool kLibm = false;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(T x) { return _mm512_set1_ps(x); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static R load_bf16(const unsigned short* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R load_f16(const unsigned short* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R sqrt(R a) { return _mm512_sqrt_ps(a); }
  static R exp2i(R t) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
};

struct VecF64 {
  using T = double;
  using R = __m512d;
  static constexpr std::size_t W = 8;
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
  static R exp2i(R t) {
    const __m512i e = _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023));
    return _mm512_castsi512_pd(_mm512_slli_epi64(e, 52));
  }
};
