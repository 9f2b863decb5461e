// Standalone C++17 test of the combination kernels (metalora/combine_kernels.hpp) at every
// instruction-set level that is compiled into this binary and supported by the CPU it runs on.
// No Python, no pybind11: it links the kernel sources directly, so it can be cross-compiled
// for arm64 and run under qemu-aarch64 to verify the NEON level (see tools/test-native.sh).
//
// For every level and every kernel of the table it checks:
//   * the result against a float64 reference computed here, within an error bound derived
//     from the arithmetic the kernel is specified to do (see "Tolerances" below);
//   * that the level agrees with the serial level within the sum of both bounds, and is
//     bit-identical to it where the kernel does a single rounding (scale_to_f32/f64);
//   * that nothing outside the output ranges is written (guard cells around every output).
// Sizes are odd on purpose (n = 1, 3, 7, 17, 33, ..., 1000, 2049, ...; ranks 1, 3, 17 ...),
// straddling the vector widths (4, 8, 16 floats) and the kernels' own blocks (128, 2048).
// Inputs are float32, float16 and bfloat16, the 16-bit ones rounded to nearest-even from
// float values here (and the f16 rounding itself is checked on all 65536 codes); the f16
// inputs include zeros, negative zeros, negatives and subnormals.
//
// Prints one summary line per level and exits non-zero on any failure. Per kernel/dtype it
// reports the worst error in units of its bound's u (u32 S for rowmix, u32 |ref| for
// scale_to_f32, u64 |ref| for scale_to_f64, u64 S_ij for syrk, u32 |ref| + u64 S for gemm),
// the worst fraction of the tolerance used, the worst distance to the serial level, and a
// digest of the output bits. Inputs are the same on every platform, so equal digests mean
// bit-identical results: the serial level should match across x86-64 and arm64 (both
// compiled without contraction), and the FMA levels (avx2, avx512, neon) should match each
// other, since every output element is the same ordered chain of FMAs at every width.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "metalora/combine_kernels.hpp"
#include "metalora/dtype.hpp"
#include "metalora/half.hpp"
#include "metalora/isa.hpp"
#include "test_util.hpp"

using metalora::DType;
using metalora::Isa;
using metalora::Src;
using metalora::combine::Kernels;
using metalora_test::fmt;
using metalora_test::kGuard;
using metalora_test::kU32;
using metalora_test::kU64;
using metalora_test::Out;
using metalora_test::Rng;
using metalora_test::same_bits;
using metalora_test::Stat;
using std::size_t;

namespace {

using Ctx = metalora_test::Ctx<Kernels, 20>;

// ---------------------------------------------------------------------------------------------
// Tolerances.
//
// u32 = 2^-24 is the unit roundoff of float32, u64 = 2^-53 that of float64. With round to
// nearest every rounded operation returns x(1 + d), |d| <= u, also when it is fused (FMA: one
// rounding instead of two, which only tightens the bound).
//
// rowmix: out = sum_{p<N} c_p x_p, accumulated in float32 in increasing p. The classic bound
// for recursive summation of N products (Higham, Accuracy and Stability, 3.1) is
//     |out - exact| <= gamma_N * S,  S = sum_p |c_p x_p|,  gamma_N = N u / (1 - N u),
// which we take as (N + 1) u32 S. The inputs are exact in float32 (the 16-bit widenings are
// exact) and the reference is a float64 sum whose own error is <= (N + 1) u64 S, negligible
// here. No product underflows (|c_p x_p| >= 2^-24 * 2^-8 for every nonzero term generated),
// so no absolute term is needed beyond one float32 subnormal step for safety.
// Two levels each within the bound agree with each other within twice the bound.
//
// scale_to_f32: one float32 product, dst = fl(s x) (the serial level computes s*x + 0, the
// SIMD levels fma(s, x, 0): both one rounding of the same exact product), so |dst - sx| <=
// u32 |sx| and all levels must be bit-identical.
// scale_to_f64: dst = fl64(double(widen(x)) * s): |dst - sx| <= u64 |sx|, bit-identical.
//
// syrk_f64: G_ij += sum_{t<n} X_ti X_tj in float64 (accumulated per t, FMA or not, then added
// to G): bound (n + 2) u64 S_ij with S_ij = |G0_ij| + sum_t |X_ti X_tj|. The reference is
// itself a float64 sum with the same bound, so we compare with 2 (n + 2) u64 S_ij.
//
// gemm_f64: Y_tk = float(sum_{p<R} X_tp P_pk): float64 sum (2 (R + 2) u64 S as for syrk)
// followed by one rounding to float32 (u32 |y|), so we allow u32 |ref| + 2 (R + 2) u64 S.
// Two levels may land on neighbouring floats when their float64 sums straddle a rounding
// boundary, hence cross-level agreement within the sum of both bounds, not bit equality.
// ---------------------------------------------------------------------------------------------

constexpr double kTiny32 = 1.401298464324817e-45;  // smallest float32 subnormal

// ----- correctly rounded float32 -> 16-bit conversions ----------------------------------------
std::uint32_t f32_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Round to nearest, ties to even; finite inputs (the generator makes no inf/NaN).
std::uint16_t f32_to_bf16(float f) {
  const std::uint32_t u = f32_bits(f);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16, round to nearest, ties to even, including subnormals and overflow to inf.
std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = f32_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN / inf
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: rounds to inf
  if (a < 0x38800000u) {
    // |f| < 2^-14: result is subnormal (or zero). Value = q * 2^-24 with q = round(|f| * 2^24).
    if (a < 0x33000000u) return sign;  // |f| < 2^-25: rounds to zero (2^-25 ties to even 0)
    const std::uint32_t e = a >> 23;               // biased exponent, 102..112
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand
    const std::uint32_t shift = 126u - e;          // |f| * 2^24 = m * 2^(e - 126 - ... )
    // |f| = m * 2^(e - 150); |f| * 2^24 = m * 2^(e - 126) = m >> (126 - e).
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<std::uint16_t>(q);  // q == 0x400 carries into the min normal
  }
  // Normal: rebias exponent (127 -> 15) and round 23 -> 10 mantissa bits.
  std::uint32_t h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
  const std::uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent / inf
  return sign | static_cast<std::uint16_t>(h);
}

const char* dname(DType d) {
  switch (d) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

// One source array in one dtype, with its exact float32 values. Every `align`-th array is
// placed one element past an aligned start so that unaligned loads are exercised.
struct Array {
  DType dt;
  std::vector<unsigned char> bytes;
  std::vector<float> val;  // widen(element), exact
  size_t off = 0;          // element offset of element 0 within bytes
  Src src() const { return Src{bytes.data() + off * metalora::dtype_size(dt), dt}; }
};

Array make_array(Rng& rng, DType dt, size_t n, bool misalign, bool specials) {
  Array a;
  a.dt = dt;
  a.off = misalign ? 1 : 0;
  const size_t es = metalora::dtype_size(dt);
  a.bytes.assign((n + a.off + 1) * es, 0xAB);
  a.val.resize(n);
  for (size_t i = 0; i < n; ++i) {
    float f = rng.value_f32();
    if (specials && dt == DType::kF16) {
      // f16 edge values: zeros of both signs, subnormals (incl. the smallest and largest),
      // values that round to subnormals, and the largest finite value.
      switch (rng.next() % 8) {
        case 0: f = (rng.next() & 1) ? -0.0f : 0.0f; break;
        case 1: {  // two draws, sequenced (argument evaluation order is unspecified)
          const double m = 1.0 + rng.uniform();
          f = static_cast<float>(std::ldexp(m, -15 - int(rng.next() % 10)));
          break;
        }
        case 2: f = -static_cast<float>(std::ldexp(static_cast<double>(1 + rng.next() % 1023), -24)); break;
        case 3: f = (rng.next() & 1) ? 5.9604644775390625e-8f : -6.097555160522461e-5f; break;
        case 4: f = (rng.next() & 1) ? 65504.0f : -65504.0f; break;
        default: break;
      }
    }
    unsigned char* p = a.bytes.data() + (i + a.off) * es;
    if (dt == DType::kF32) {
      std::memcpy(p, &f, 4);
      a.val[i] = f;
    } else if (dt == DType::kBF16) {
      const std::uint16_t h = f32_to_bf16(f);
      std::memcpy(p, &h, 2);
      a.val[i] = metalora::bf16_to_f32(h);
    } else {
      const std::uint16_t h = f32_to_f16(f);
      std::memcpy(p, &h, 2);
      a.val[i] = metalora::f16_to_f32(h);
    }
  }
  return a;
}

// Records one comparison; returns false (and reports) when |got - ref| > tol.
bool check(Ctx& c, Stat& s, double got, double ref, double tol, double unit, const std::string& where,
           bool hash = true) {
  ++s.checks;
  if (hash) s.mix(got);
  const double err = std::fabs(got - ref);
  if (!(err <= tol)) {  // also catches NaN
    c.fail(fmt("%s: %s got %.9g ref %.17g err %.3g tol %.3g", s.name.c_str(), where.c_str(), got, ref, err, tol));
    return false;
  }
  if (unit > 0 && err / unit > s.worst) s.worst = err / unit;
  if (tol > 0 && err / tol > s.worst_tol) s.worst_tol = err / tol;
  return true;
}

void check_xlev(Ctx& c, Stat& s, double got, double ser, double tol, double unit, const std::string& where) {
  const double d = std::fabs(got - ser);
  if (!(d <= tol)) {
    c.fail(fmt("%s: %s differs from serial: %.9g vs %.9g (tol %.3g)", s.name.c_str(), where.c_str(), got, ser, tol));
    return;
  }
  if (unit > 0 && d / unit > s.worst_xlev) s.worst_xlev = d / unit;
}

const size_t kSizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 128, 129, 257, 1000, 2047, 2048, 2049, 4100};
const DType kDTypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// ----- rowmix --------------------------------------------------------------------------------
// dmode: 0..2 = all sources of kDTypes[dmode]; 3 = sources cycle through the three dtypes.
void test_rowmix(Ctx& c, Rng& rng, size_t n, size_t nsrc, size_t m, int dmode) {
  std::vector<Array> arrs;
  for (size_t p = 0; p < nsrc; ++p) {
    const DType dt = dmode < 3 ? kDTypes[dmode] : kDTypes[p % 3];
    arrs.push_back(make_array(rng, dt, n, (p + n) % 3 == 1, true));
  }
  std::vector<Src> src;
  for (auto& a : arrs) src.push_back(a.src());
  std::vector<float> coef(m * nsrc);
  for (auto& x : coef) x = rng.value_f32();
  if (!coef.empty() && nsrc > 2) coef[1] = 0.0f;  // zero coefficients are allowed
  const size_t ldo = m == 1 ? n : n + 5;
  const size_t tot = m == 1 ? n : (m - 1) * ldo + n;
  Out<float> got(tot), ser(tot);
  c.k->rowmix(src.data(), nsrc, coef.data(), m, n, got.data(), ldo);
  c.serial->rowmix(src.data(), nsrc, coef.data(), m, n, ser.data(), ldo);
  const std::string name = fmt("rowmix m%s1 %s", m == 1 ? "=" : ">", dmode < 3 ? dname(kDTypes[dmode]) : "mixed");
  Stat& s = c.stat(name);
  if (!got.guards_ok(tot)) c.fail(fmt("%s: wrote outside [0, n) n=%zu nsrc=%zu m=%zu", name.c_str(), n, nsrc, m));
  // Cells between rows (ldo > n) must stay untouched as well.
  if (!got.gaps_ok(m, n, ldo)) c.fail(fmt("%s: wrote the gap between rows, n=%zu m=%zu", name.c_str(), n, m));
  int reported = 0;
  for (size_t k = 0; k < m; ++k)
    for (size_t i = 0; i < n; ++i) {
      double ref = 0.0, S = 0.0;
      for (size_t p = 0; p < nsrc; ++p) {
        const double t = static_cast<double>(coef[k * nsrc + p]) * arrs[p].val[i];
        ref += t;
        S += std::fabs(t);
      }
      const double unit = kU32 * S;
      const double tol = (nsrc + 1) * unit + kTiny32;
      const std::string where = fmt("n=%zu nsrc=%zu m=%zu k=%zu i=%zu", n, nsrc, m, k, i);
      const float g = got.data()[k * ldo + i];
      if (!check(c, s, g, ref, tol, unit, where) && ++reported > 3) return;
      check_xlev(c, s, g, ser.data()[k * ldo + i], 2 * tol, unit, where);
    }
}

// ----- scale_to_f32 / scale_to_f64 -------------------------------------------------------------
void test_scale(Ctx& c, Rng& rng, size_t n, DType dt, bool misalign) {
  const Array a = make_array(rng, dt, n, misalign, true);
  for (float scale : {1.0f, -0.7f, rng.value_f32()}) {
    Out<float> got(n), ser(n);
    c.k->scale_to_f32(a.src(), scale, n, got.data());
    c.serial->scale_to_f32(a.src(), scale, n, ser.data());
    Stat& s = c.stat(fmt("scale_to_f32 %s", dname(dt)));
    if (!got.guards_ok(n)) c.fail(fmt("scale_to_f32: wrote outside [0, n) n=%zu", n));
    for (size_t i = 0; i < n; ++i) {
      const double ref = static_cast<double>(scale) * a.val[i];
      const double unit = kU32 * std::fabs(ref);
      const std::string where = fmt("n=%zu i=%zu scale=%g", n, i, scale);
      if (!check(c, s, got.data()[i], ref, unit + kTiny32, unit, where)) break;
      if (!same_bits(got.data()[i], ser.data()[i])) {
        c.fail(fmt("scale_to_f32 %s: %s not bit-identical to serial", dname(dt), where.c_str()));
        break;
      }
    }
  }
  for (double scale : {1.0, -0.3, 1.0 / 3.0}) {
    std::vector<double> buf(n + 2 * kGuard, 12345.678), sbuf(n + 2 * kGuard);
    c.k->scale_to_f64(a.src(), scale, n, buf.data() + kGuard);
    c.serial->scale_to_f64(a.src(), scale, n, sbuf.data() + kGuard);
    Stat& s = c.stat(fmt("scale_to_f64 %s", dname(dt)));
    for (size_t i = 0; i < kGuard; ++i)
      if (buf[i] != 12345.678 || buf[kGuard + n + i] != 12345.678) {
        c.fail(fmt("scale_to_f64: wrote outside [0, n) n=%zu", n));
        break;
      }
    for (size_t i = 0; i < n; ++i) {
      const double ref = scale * static_cast<double>(a.val[i]);
      const double unit = kU64 * std::fabs(ref);
      const double g = buf[kGuard + i];
      const std::string where = fmt("n=%zu i=%zu scale=%g", n, i, scale);
      if (!check(c, s, g, ref, unit, unit, where)) break;
      if (!same_bits(g, sbuf[kGuard + i])) {
        c.fail(fmt("scale_to_f64 %s: %s not bit-identical to serial", dname(dt), where.c_str()));
        break;
      }
    }
  }
}

// Widening of f16 infinities and NaNs (not produced by the random inputs): inf stays inf with
// its sign, NaN stays NaN, through every load path (vector body and tail).
void test_scale_specials(Ctx& c) {
  const std::uint16_t codes[] = {0x7c00, 0xfc00, 0x7e00, 0x7c01, 0xfe00, 0x0001, 0x8001, 0x03ff,
                                 0x0400, 0x7bff, 0xfbff, 0x0000, 0x8000, 0x3c00, 0xbc00, 0x3555,
                                 0x7c00, 0x7e00, 0x0200};
  const size_t n = sizeof codes / sizeof codes[0];
  for (DType dt : {DType::kF16, DType::kBF16}) {
    std::vector<float> out(n);
    c.k->scale_to_f32(Src{codes, dt}, 1.0f, n, out.data());
    for (size_t i = 0; i < n; ++i) {
      const float want = dt == DType::kF16 ? metalora::f16_to_f32(codes[i]) : metalora::bf16_to_f32(codes[i]);
      const bool ok = std::isnan(want) ? std::isnan(out[i]) : same_bits(out[i], want);
      if (!ok) c.fail(fmt("scale_to_f32 %s special code 0x%04x: got %g want %g", dname(dt), codes[i], out[i], want));
    }
  }
}

// A float64 value with more than 24 significant bits. The draws are sequenced: every RNG call
// is its own statement, so all platforms (x86-64, arm64) get the same inputs.
double draw64(Rng& rng) {
  const double a = rng.value_f32();
  return a * (1.0 + rng.uniform());
}

// ----- syrk_f64 ------------------------------------------------------------------------------
size_t pad8(size_t r) { return (r + 7) / 8 * 8; }

void test_syrk(Ctx& c, Rng& rng, size_t n, size_t r) {
  const size_t R = pad8(r);  // the kernel needs R % 8 == 0; the driver zero-pads like this
  std::vector<double> X(n * R, 0.0);
  for (size_t t = 0; t < n; ++t)
    for (size_t p = 0; p < r; ++p) X[t * R + p] = draw64(rng);
  std::vector<double> G0(R * R);
  for (auto& g : G0) g = rng.value_f32();
  std::vector<double> G(G0), Gs(G0);
  c.k->syrk_f64(X.data(), n, R, G.data());
  c.serial->syrk_f64(X.data(), n, R, Gs.data());
  Stat& s = c.stat("syrk_f64");
  for (size_t i = 0; i < R; ++i)
    for (size_t j = 0; j < R; ++j) {
      double ref = G0[i * R + j], S = std::fabs(G0[i * R + j]);
      for (size_t t = 0; t < n; ++t) {
        const double v = X[t * R + i] * X[t * R + j];
        ref += v;
        S += std::fabs(v);
      }
      const double unit = kU64 * S;
      const double tol = 2.0 * (n + 2) * unit;
      const double g = G[i * R + j];
      const bool required = j + (i % 4) >= i;  // j >= i - i % 4
      const std::string where = fmt("n=%zu r=%zu R=%zu i=%zu j=%zu", n, r, R, i, j);
      if (!required && same_bits(g, G0[i * R + j])) continue;  // below the band: may be untouched
      // Entries below the band are only in the digest when required (levels differ in which
      // extra entries they compute).
      if (!check(c, s, g, ref, tol, unit, where, required)) return;
      if (required || !same_bits(Gs[i * R + j], G0[i * R + j]))
        check_xlev(c, s, g, Gs[i * R + j], 2 * tol, unit, where);
    }
}

// ----- gemm_f64 ------------------------------------------------------------------------------
void test_gemm(Ctx& c, Rng& rng, size_t n, size_t r, size_t m) {
  const size_t R = pad8(r), mp = pad8(m), ldy = m + 3;
  std::vector<double> X(n * R, 0.0), P(R * mp, 0.0);
  for (size_t t = 0; t < n; ++t)
    for (size_t p = 0; p < r; ++p) X[t * R + p] = draw64(rng);
  for (size_t p = 0; p < r; ++p)
    for (size_t k = 0; k < m; ++k) P[p * mp + k] = static_cast<double>(rng.value_f32()) / 3.0;
  const size_t tot = (n - 1) * ldy + m;
  Out<float> Y(tot), Ys(tot);
  c.k->gemm_f64(X.data(), n, R, P.data(), m, mp, Y.data(), ldy);
  c.serial->gemm_f64(X.data(), n, R, P.data(), m, mp, Ys.data(), ldy);
  Stat& s = c.stat("gemm_f64");
  if (!Y.guards_ok(tot)) c.fail(fmt("gemm_f64: wrote outside Y, n=%zu r=%zu m=%zu", n, r, m));
  if (!Y.gaps_ok(n, m, ldy)) c.fail(fmt("gemm_f64: wrote columns k >= m, n=%zu r=%zu m=%zu", n, r, m));
  for (size_t t = 0; t < n; ++t)
    for (size_t k = 0; k < m; ++k) {
      double ref = 0.0, S = 0.0;
      for (size_t p = 0; p < R; ++p) {
        const double v = X[t * R + p] * P[p * mp + k];
        ref += v;
        S += std::fabs(v);
      }
      const double unit = kU32 * std::fabs(ref) + kU64 * S;  // reported in this mixed unit
      const double tol = kU32 * std::fabs(ref) + 2.0 * (R + 2) * kU64 * S + kTiny32;
      const std::string where = fmt("n=%zu r=%zu m=%zu t=%zu k=%zu", n, r, m, t, k);
      const float g = Y.data()[t * ldy + k];
      if (!check(c, s, g, ref, tol, unit, where)) return;
      check_xlev(c, s, g, Ys.data()[t * ldy + k], 2 * tol, unit, where);
    }
}

// ----- self-test of the generator's f16/bf16 rounding -----------------------------------------
int test_rounding() {
  int bad = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const std::uint16_t c = static_cast<std::uint16_t>(h);
    if ((c & 0x7c00u) == 0x7c00u && (c & 0x3ffu)) continue;  // NaN
    const float f = metalora::f16_to_f32(c);
    if (f32_to_f16(f) != c) ++bad;  // exact values round-trip
    // The midpoint to the next code up (same sign, away from zero) ties to the even code.
    if ((c & 0x7fffu) < 0x7bffu) {
      const double f2 = metalora::f16_to_f32(static_cast<std::uint16_t>(c + 1));
      const float mid = static_cast<float>((static_cast<double>(f) + f2) / 2.0);  // exact in f32
      const std::uint16_t want = (c & 1u) ? static_cast<std::uint16_t>(c + 1) : c;
      if (f32_to_f16(mid) != want) ++bad;
      // Just above / below the midpoint rounds up / down.
      const float above = std::nextafter(mid, std::signbit(mid) ? -1e9f : 1e9f);
      const float below = std::nextafter(mid, 0.0f);
      if (f32_to_f16(above) != static_cast<std::uint16_t>(c + 1) || f32_to_f16(below) != c) ++bad;
    }
  }
  if (f32_to_f16(65520.0f) != 0x7c00u || f32_to_f16(65519.996f) != 0x7bffu) ++bad;
  if (f32_to_f16(2.98023223876953125e-8f) != 0x0000u) ++bad;  // 2^-25: tie to even zero
  if (f32_to_f16(2.98023259e-8f) != 0x0001u) ++bad;           // just above 2^-25
  if (f32_to_bf16(1.00390625f) != 0x3f80u || f32_to_bf16(1.01171875f) != 0x3f82u) ++bad;  // ties
  return bad;
}

}  // namespace

int main() {
  metalora_test::print_levels("metalora kernel test");

  const int bad_rounding = test_rounding();
  std::printf("input generator: f32->f16/bf16 round-to-nearest-even self-test %s\n",
              bad_rounding ? "FAILED" : "ok");
  long total_failures = bad_rounding;

  const Kernels* serial = metalora::combine::kernels_for(Isa::kSerial);
  for (Isa isa : metalora::available_isas()) {
    Ctx c{isa, metalora::combine::kernels_for(isa), serial, 0, {}};
    if (!c.k || !serial) {
      std::printf("[%s] FAIL: kernels_for returned nullptr\n", metalora::isa_name(isa));
      ++total_failures;
      continue;
    }
    Rng rng(0x6d65746c6f7261ull);  // same inputs for every level
    // rowmix, m == 1 (the linear mode's weighted sum) and m > 1 (the projection A_out = QA A).
    for (size_t n : kSizes)
      for (size_t nsrc : {size_t(0), size_t(1), size_t(3), size_t(17)})
        for (size_t m : {size_t(1), size_t(2), size_t(5)})
          for (int dmode = 0; dmode < 4; ++dmode) {
            if (nsrc == 0 && dmode > 0) continue;
            test_rowmix(c, rng, n, nsrc, m, dmode);
          }
    for (size_t n : {size_t(5), size_t(130), size_t(2049)})  // many adapters (48 sources)
      for (size_t m : {size_t(1), size_t(3)})
        for (int dmode = 0; dmode < 4; ++dmode) test_rowmix(c, rng, n, 48, m, dmode);
    // scale_to_f32 / scale_to_f64, aligned and unaligned.
    for (size_t n : kSizes)
      for (DType dt : kDTypes)
        for (bool mis : {false, true}) test_scale(c, rng, n, dt, mis);
    test_scale_specials(c);
    // syrk_f64: ranks 1, 3, 17 (zero padded to 8, 8, 24 like the driver) and full 8, 24, 32.
    for (size_t n : {size_t(1), size_t(3), size_t(7), size_t(17), size_t(33), size_t(128), size_t(129), size_t(1000)})
      for (size_t r : {size_t(1), size_t(3), size_t(8), size_t(17), size_t(24), size_t(32)}) test_syrk(c, rng, n, r);
    // gemm_f64: Y = X P with m output columns, P zero padded to mp = pad8(m).
    for (size_t n : {size_t(1), size_t(3), size_t(7), size_t(17), size_t(129), size_t(1000)})
      for (size_t r : {size_t(1), size_t(3), size_t(17), size_t(24)})
        for (size_t m : {size_t(1), size_t(3), size_t(8), size_t(17), size_t(33)}) test_gemm(c, rng, n, r, m);

    metalora_test::print_level_report(c, 18, 6);
    total_failures += c.failures;
  }
  metalora_test::print_skipped_levels();
  std::printf("%s\n", total_failures ? "KERNEL TEST FAILED" : "kernel test passed");
  return total_failures ? 1 : 0;
}
