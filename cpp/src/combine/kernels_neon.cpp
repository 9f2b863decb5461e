// NEON (Advanced SIMD) level for arm64, where it is always present: Apple silicon, Graviton,
// Snapdragon laptops. fp16 widening uses FCVTL, bf16 widening a 16-bit shift.
#include <arm_neon.h>

#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"

namespace {

struct Neon {
  static constexpr std::size_t W = 4;
  using F = float32x4_t;
  static F zero() { return vdupq_n_f32(0.0f); }
  static F set1(float x) { return vdupq_n_f32(x); }
  static F load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, F v) { vst1q_f32(p, v); }
  static F load_bf16(const unsigned short* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static F load_f16(const unsigned short* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static constexpr std::size_t WD = 2;
  using D = float64x2_t;
  static D dzero() { return vdupq_n_f64(0.0); }
  static D dset1(double x) { return vdupq_n_f64(x); }
  static D dload(const double* p) { return vld1q_f64(p); }
  static void dstore(double* p, D v) { vst1q_f64(p, v); }
  static D dfma(D a, D b, D c) { return vfmaq_f64(c, a, b); }
};

#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kNeon = make_kernels<Neon>();
}
