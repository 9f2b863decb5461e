// Vector traits of the portable scalar level, shared by every kernel family (combine, distances).
//
// Included by the family's kernels_serial.cpp INSIDE its anonymous namespace (so every kernel
// instantiated over these traits has internal linkage), after that file has included the standard
// headers and "metalora/half.hpp": this header includes nothing itself. That file is compiled at
// the baseline instruction set with floating-point contraction off, so fma(a, b, c) = a * b + c is
// two roundings here, and sqrt / exp are the C library's (kLibm = true: the distance kernels call
// exp one lane at a time instead of their vectorised exp2i-based one).
//
// VecF32 / VecF64 provide: T (lane type), R (register), W (lanes), kLibm, zero, set1, load, store,
// add, sub, mul, div, fma, max, min, sqrt, exp (no exp2i: kLibm); VecF32 also load_bf16 /
// load_f16 (W 16-bit floats widened to float32).
#pragma once

template <class Tp>
struct ScalarVec {
  using T = Tp;
  using R = Tp;
  static constexpr std::size_t W = 1;
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
};

struct VecF32 : ScalarVec<float> {
  static R load_bf16(const unsigned short* p) { return metalora::bf16_to_f32(*p); }
  static R load_f16(const unsigned short* p) { return metalora::f16_to_f32(*p); }
};

struct VecF64 : ScalarVec<double> {};
