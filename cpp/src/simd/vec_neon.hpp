// Vector traits of the NEON (Advanced SIMD) level for arm64, shared by every kernel family
// (combine, distances). Float64 lanes (float64x2_t) are part of AArch64's Advanced SIMD; fp16
// widening uses FCVTL, bf16 widening a 16-bit shift.
//
// Included by the family's kernels_neon.cpp INSIDE its anonymous namespace (so every kernel
// instantiated over these traits has internal linkage), after that file has included
// <arm_neon.h> and the standard headers: this header includes nothing itself.
//
// VecF32 / VecF64 provide: T (lane type), R (register), W (lanes), kLibm, zero, set1, load, store,
// add, sub, mul, div, fma (one rounding), max, min, sqrt, exp2i(t) = 2^(bits(t)) for the
// distances' vectorised exp (kLibm = false: no exp of their own); VecF32 also load_bf16 /
// load_f16 (W 16-bit floats widened to float32).
#pragma once

struct VecF32 {
  using T = float;
  using R = float32x4_t;
  static constexpr std::size_t W = 4;
  static constexpr bool kLibm = false;
  static R zero() { return vdupq_n_f32(0.0f); }
  static R set1(T x) { return vdupq_n_f32(x); }
  static R load(const T* p) { return vld1q_f32(p); }
  static void store(T* p, R v) { vst1q_f32(p, v); }
  static R load_bf16(const unsigned short* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static R load_f16(const unsigned short* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static R add(R a, R b) { return vaddq_f32(a, b); }
  static R sub(R a, R b) { return vsubq_f32(a, b); }
  static R mul(R a, R b) { return vmulq_f32(a, b); }
  static R div(R a, R b) { return vdivq_f32(a, b); }
  static R fma(R a, R b, R c) { return vfmaq_f32(c, a, b); }
  static R max(R a, R b) { return vmaxq_f32(a, b); }
  static R min(R a, R b) { return vminq_f32(a, b); }
  static R sqrt(R a) { return vsqrtq_f32(a); }
  static R exp2i(R t) {
    const int32x4_t e = vaddq_s32(vreinterpretq_s32_f32(t), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
  }
};

struct VecF64 {
  using T = double;
  using R = float64x2_t;
  static constexpr std::size_t W = 2;
  static constexpr bool kLibm = false;
  static R zero() { return vdupq_n_f64(0.0); }
  static R set1(T x) { return vdupq_n_f64(x); }
  static R load(const T* p) { return vld1q_f64(p); }
  static void store(T* p, R v) { vst1q_f64(p, v); }
  static R add(R a, R b) { return vaddq_f64(a, b); }
  static R sub(R a, R b) { return vsubq_f64(a, b); }
  static R mul(R a, R b) { return vmulq_f64(a, b); }
  static R div(R a, R b) { return vdivq_f64(a, b); }
  static R fma(R a, R b, R c) { return vfmaq_f64(c, a, b); }
  static R max(R a, R b) { return vmaxq_f64(a, b); }
  static R min(R a, R b) { return vminq_f64(a, b); }
  static R sqrt(R a) { return vsqrtq_f64(a); }
  static R exp2i(R t) {
    const int64x2_t e = vaddq_s64(vreinterpretq_s64_f64(t), vdupq_n_s64(1023));
    return vreinterpretq_f64_s64(vshlq_n_s64(e, 52));
  }
};
