// Vector traits of the AVX2 + FMA + F16C level, shared by every kernel family (combine, distances).
//
// Included by the family's kernels_avx2.cpp INSIDE its anonymous namespace (so every kernel
// instantiated over these traits has internal linkage and no AVX2 code can be picked by the
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
  using R = __m256;
  static constexpr std::size_t W = 8;
  static constexpr bool kLibm = false;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(T x) { return _mm256_set1_ps(x); }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static R load_bf16(const unsigned short* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static R load_f16(const unsigned short* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static R exp2i(R t) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
};

struct VecF64 {
  using T = double;
  using R = __m256d;
  static constexpr std::size_t W = 4;
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
  static R exp2i(R t) {
    const __m256i e = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(1023));
    return _mm256_castsi256_pd(_mm256_slli_epi64(e, 52));
  }
};
