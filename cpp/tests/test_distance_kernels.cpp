// Standalone C++17 test of the distance kernels (metalora/distance_kernels.hpp: pack, gram,
// sqnorm, softmin, ksum; float32 and float64 halves) at every instruction-set level compiled into
// this binary and supported by the CPU it runs on. No Python: it links the kernel sources and the
// driver (for kernels_for) directly, so it can be cross-compiled for arm64 and run under
// qemu-aarch64 to verify the NEON level (see tools/test-native.sh).
//
// For every level, both dtypes and every kernel of the table it checks:
//   * the result against a float64 reference computed here, within an error bound derived from
//     the arithmetic the kernel is specified to do (see "Tolerances" below);
//   * that the level agrees with the serial level within the sum of both bounds (pack: bit
//     equality, it only copies);
//   * that nothing outside the outputs is written (guard cells around every output, and the
//     gaps between rows when the leading dimension exceeds the row length).
// Sizes are odd on purpose (n, m, d = 1, 3, 7, 17, 33, 129, 383/385 ...), straddling the vector
// widths (2..16 lanes), the GEMM micro-kernel (MR = 4..14 rows, NR = 2..32 columns) and the
// driver's row blocks (48 rows of gram, 16 of softmin). The vectorised exp is also swept directly
// (through ksum with one RBF term), including underflow and -inf.
//
// Prints one summary line per level and exits non-zero on any failure. Per kernel/dtype it
// reports the worst error in units of u (the dtype's unit roundoff) times the kernel's scale
// (named below), the worst fraction of the tolerance used, the worst distance to the serial level
// in the same unit, and a digest of the output bits (equal digests = bit-identical outputs).
// Inputs are the same on every platform (every random draw is its own statement). Expected bit
// equalities: serial on x86-64 and arm64 (no contraction; glibc's exp/expf agree here); gram and
// vexp on every FMA level (avx2, avx512, neon: the same ordered FMA chain per element); pack's
// layout, and the reductions of sqnorm / softmin / ksum, depend on the level's vector width, so
// those only agree within the bounds. The level's overall digest mixes all of them.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "metalora/distance_kernels.hpp"
#include "metalora/distances.hpp"
#include "metalora/isa.hpp"
#include "test_util.hpp"

using metalora::Isa;
using metalora::distances::Kernels;
using metalora::distances::KernelsT;
using metalora_test::fmt;
using metalora_test::kU32;
using metalora_test::kU64;
using metalora_test::Out;
using metalora_test::Rng;
using metalora_test::round_up;
using metalora_test::same_bits;
using metalora_test::Stat;
using std::size_t;

namespace {

// The shared context plus the worst measured vexp error.
struct Ctx : metalora_test::Ctx<Kernels, 30> {
  double exp_ulp[2] = {0, 0};  // worst measured vexp error in ulp (f32, f64)
};

// ---------------------------------------------------------------------------------------------
// Tolerances. u = 2^-24 (float32) or 2^-53 (float64), the unit roundoff; every rounded operation
// returns x (1 + d), |d| <= u, fused (FMA) or not. The serial level computes a * b + c with two
// roundings (no contraction), the SIMD levels with one; the bounds below hold for both.
//
// gram: G = max(lo, fl(fl(alpha * acc + xn) + yn)), acc = fl(<x_i, y_j>) over d terms:
//   |acc - <x, y>| <= gamma_d S, S = sum_p |x_p y_p| (Higham 3.1, fused or not), taken as
//   (d + 1) u S; alpha * acc + xn adds u |alpha acc| (unfused product) + u |alpha acc + xn|,
//   + yn adds u |result|; max(lo, .) is 1-Lipschitz. Hence
//     tol = u (|alpha| (d + 4) S + 2 |xn| + |yn|)                     (unit reported: u |alpha| S)
// sqnorm: out = sum_k x_k^2 (W lane-wise FMA chains, summed in float64, one final rounding):
//     tol = (d + 2) u ref                                              (unit: u ref)
// softmin: out = -eps (M + log S), S = sum_j exp(x_j), x_j = fl(a_j - M),
//   a_j = fl(h_j - c_j inv_eps) (one FMA or a product and a sum), M = max_j a_j. With w_j the
//   exact softmax weights, the error of log S is, to first order, sum_j w_j e_j where e_j is the
//   absolute error of x_j (= relative error of its exp term) plus the exp error and the float
//   sum's error:  e_j <= u (2 |c_j inv_eps| + |h_j|) + u |x_j|;  exp: relative <= E (below);
//   sum of mp = round_up(m, W) terms in float (two accumulators then float64): (m + 2) u;
//   terms below the exp clamp (see vexp) add at most exp(lo) (1 + E) each, relative to S >= 1
//   (the maximum's term is exp(0) = 1 exactly). The float64 tail (log, + M, * eps) adds
//   4 u64 eps (|M| + |log S| + 1). So
//     tol = eps [sum_j w_j e_j + E + (m + 2) u + mp exp(lo) (1 + E)] + 4 u64 eps (|M| + |L| + 1)
//   (unit reported: u eps). The reference is float64 (exact args for float32 inputs); for the
//   float64 half the reference has an error of the same kind and size, so tol is doubled there.
// ksum: out = sum_j k(D_j), accumulated in T (two vector accumulators + a tail, then float64):
//   per term: rbf exp(fl(-g D)): relative u |g D| (argument) + E, plus exp(lo)(1 + E) absolute;
//   multiscale a / (a + D): 2 u relative (float32, and float64 with np > 5), float64 np <= 5 is
//   one division of a fraction accumulated as num / den of positive terms: (4 np + 4) u
//   relative, plus np max(a) 1e-60 absolute where D is capped at 1e60; sqrt: u relative.
//   Sums over q (np terms) and j (m terms) in T: (np + m + 2) u sum_j k_j.  (unit: u sum_j k_j)
//   Float64 half: doubled for the reference's own exp / division / sqrt roundings.
// Cross-level agreement: within the sum of both levels' bounds (2 tol).
//
// The vectorised exp (kernels_impl.hpp, vexp): x clamped to [lo, hi] (float: [-87.3, 88.3],
// double: [-708, 709]); n = round(x / ln 2) by the 1.5 * 2^p magic-number trick; r = x - n ln 2
// with a two-constant Cody-Waite split (|r| <= ln2 / 2 + tiny); exp(r) by its Taylor polynomial
// (degree 7 for float: truncation r^8/8! e^|r| <= 7.4e-9 = 0.12 ulp relative at worst; degree
// 13 for double: < 6e-18, 0.05 ulp) in Horner form with FMAs; scaled by 2^n built in the exponent
// bits (exact: n stays within the normal range). Rounding of r (<= 0.35 u relative after exp),
// the ln 2 split (n ln2lo error <= 127 * 2^-24 * 2.1e-4 = 1.6e-9) and Horner (about 1 u) give
// well under 2 ulp; the header promises < 2 ulp and that is what we test: relative error
// E = 2 ulp = 4 u (ulp of a value in [2^k, 2^(k+1)) is 2^(k - p + 1) <= 2 u |value|) for x in
// [lo, 0], and for x < lo (including -inf) 0 <= vexp(x) <= exp(lo) (1 + E) (no underflow to 0:
// the clamp returns exp(lo), about the smallest normal number). The serial level uses the C
// library (expf / exp, < 1 ulp, and real underflow to 0), which satisfies the same bounds.
// The measured worst ulp error of vexp is printed per level.
// ---------------------------------------------------------------------------------------------

template <class T> struct Tr;
template <> struct Tr<float> {
  static constexpr double u = kU32;
  static constexpr double exp_lo = -87.3;   // ExpConst<float>::lo (as float: -87.3000030518)
  static constexpr double tiny = 1.401298464324817e-45;
  static const char* name() { return "f32"; }
};
template <> struct Tr<double> {
  static constexpr double u = kU64;
  static constexpr double exp_lo = -708.0;
  static constexpr double tiny = 4.9406564584124654e-324;
  static const char* name() { return "f64"; }
};
template <class T> const KernelsT<T>& half(const Kernels& k);
template <> const KernelsT<float>& half<float>(const Kernels& k) { return k.f32; }
template <> const KernelsT<double>& half<double>(const Kernels& k) { return k.f64; }

template <class T> double exp_err() { return 4.0 * Tr<T>::u; }  // E = 2 ulp
// exp(lo) (1 + E): bound on the clamped value (float: lo rounds to -87.30000305 in float; the
// bound uses exp(-87.3) * 1.001, which covers both).
template <class T> double exp_floor() { return std::exp(Tr<T>::exp_lo) * 1.001; }
// Reference-error factor: the float64 half's reference is itself float64.
template <class T> double ref_factor() { return sizeof(T) == 8 ? 2.0 : 1.0; }

bool check(Ctx& c, Stat& s, double got, double ref, double tol, double unit, const std::string& where) {
  ++s.checks;
  const double err = got == ref ? 0.0 : std::fabs(got - ref);  // inf == inf: 0
  if (!(err <= tol)) {  // also catches NaN
    c.fail(fmt("%s: %s got %.17g ref %.17g err %.3g tol %.3g", s.name.c_str(), where.c_str(), got,
               ref, err, tol));
    return false;
  }
  if (unit > 0 && err / unit > s.worst) s.worst = err / unit;
  if (tol > 0 && err / tol > s.worst_tol) s.worst_tol = err / tol;
  return true;
}
void check_xlev(Ctx& c, Stat& s, double got, double ser, double tol, double unit, const std::string& where) {
  const double d = got == ser ? 0.0 : std::fabs(got - ser);
  if (!(d <= tol)) {
    c.fail(fmt("%s: %s differs from serial: %.17g vs %.17g (tol %.3g)", s.name.c_str(), where.c_str(),
               got, ser, tol));
    return;
  }
  if (unit > 0 && d / unit > s.worst_xlev) s.worst_xlev = d / unit;
}

// ----- pack + gram ---------------------------------------------------------------------------
// Packs Y and checks the layout bit for bit (including the zero columns and nothing written past
// packed_size), then G = max(lo, alpha X Y^T + xn + yn) for the two uses in the driver:
// squared distances (alpha = -2, norms, lo = 0) and plain inner products (alpha = 1, no norms,
// lo = -inf), with row strides larger than d and ldg > m.
template <class T>
void test_gram(Ctx& c, Rng& rng, size_t n, size_t m, size_t d) {
  const KernelsT<T>& k = half<T>(*c.k);
  const KernelsT<T>& ks = half<T>(*c.serial);
  const std::string tn = Tr<T>::name();
  const size_t ldx = d + 1, ldy = d + 2, ldg = m + 3;
  std::vector<T> X(n * ldx, T(7)), Y(m * ldy, T(7));
  for (size_t i = 0; i < n; ++i)
    for (size_t p = 0; p < d; ++p) X[i * ldx + p] = rng.val<T>();
  for (size_t j = 0; j < m; ++j)
    for (size_t p = 0; p < d; ++p) Y[j * ldy + p] = rng.val<T>();
  // pack
  const size_t nr = k.nr, psize = round_up(m, nr) * d;
  Out<T> Yp(psize), Yps(round_up(m, ks.nr) * d);
  k.pack(Y.data(), ldy, m, d, Yp.data());
  ks.pack(Y.data(), ldy, m, d, Yps.data());
  {
    Stat& s = c.stat("pack " + tn);
    if (!Yp.guards_ok(psize)) c.fail(fmt("pack %s: wrote outside the packed size, m=%zu d=%zu", tn.c_str(), m, d));
    bool ok = true;
    for (size_t jb = 0; jb < m && ok; jb += nr)
      for (size_t cc = 0; cc < nr && ok; ++cc)
        for (size_t p = 0; p < d; ++p) {
          const T g = Yp.data()[(jb / nr) * nr * d + p * nr + cc];
          const T want = jb + cc < m ? Y[(jb + cc) * ldy + p] : T(0);
          ++s.checks;
          s.mix(g);
          if (!same_bits(g, want)) {
            c.fail(fmt("pack %s: m=%zu d=%zu nr=%zu col %zu p %zu wrong", tn.c_str(), m, d, nr, jb + cc, p));
            ok = false;
            break;
          }
        }
  }
  // norms (float64 sums rounded to T; exact inputs to the kernel either way)
  std::vector<T> xn(n), yn(m);
  for (size_t i = 0; i < n; ++i) {
    double s = 0;
    for (size_t p = 0; p < d; ++p) s += double(X[i * ldx + p]) * X[i * ldx + p];
    xn[i] = static_cast<T>(s);
  }
  for (size_t j = 0; j < m; ++j) {
    double s = 0;
    for (size_t p = 0; p < d; ++p) s += double(Y[j * ldy + p]) * Y[j * ldy + p];
    yn[j] = static_cast<T>(s);
  }
  const double u = Tr<T>::u;
  for (int mode = 0; mode < 2; ++mode) {
    const T alpha = mode == 0 ? T(-2) : T(1);
    const T lo = mode == 0 ? T(0) : -std::numeric_limits<T>::infinity();
    const T* pxn = mode == 0 ? xn.data() : nullptr;
    const T* pyn = mode == 0 ? yn.data() : nullptr;
    const size_t tot = (n - 1) * ldg + m;
    Out<T> G(tot), Gs(tot);
    k.gram(X.data(), ldx, n, Yp.data(), m, d, alpha, pxn, pyn, lo, G.data(), ldg);
    ks.gram(X.data(), ldx, n, Yps.data(), m, d, alpha, pxn, pyn, lo, Gs.data(), ldg);
    Stat& s = c.stat(fmt("gram %s %s", mode == 0 ? "sqdist" : "dot", tn.c_str()));
    if (!G.guards_ok(tot)) c.fail(fmt("%s: wrote outside G, n=%zu m=%zu d=%zu", s.name.c_str(), n, m, d));
    if (!G.gaps_ok(n, m, ldg))
      c.fail(fmt("%s: wrote columns j >= m, n=%zu m=%zu d=%zu", s.name.c_str(), n, m, d));
    int reported = 0;
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < m; ++j) {
        double dot = 0, S = 0;
        for (size_t p = 0; p < d; ++p) {
          const double v = double(X[i * ldx + p]) * double(Y[j * ldy + p]);
          dot += v;
          S += std::fabs(v);
        }
        const double a = double(alpha);
        const double xv = pxn ? double(xn[i]) : 0.0, yv = pyn ? double(yn[j]) : 0.0;
        double ref = a * dot + xv + yv;
        if (ref < double(lo)) ref = double(lo);
        const double unit = u * std::fabs(a) * S;
        // + the float64 reference's own error (d + 4) u64 (|a| S + |xn| + |yn|), and doubled for
        // the float64 half.
        const double scale = std::fabs(a) * (d + 4) * S + 2 * std::fabs(xv) + std::fabs(yv);
        const double tol = ref_factor<T>() * u * scale + (d + 4) * kU64 * scale + Tr<T>::tiny;
        const T g = G.data()[i * ldg + j];
        s.mix(g);
        const std::string where = fmt("n=%zu m=%zu d=%zu i=%zu j=%zu", n, m, d, i, j);
        if (!check(c, s, g, ref, tol, unit, where) && ++reported > 3) return;
        check_xlev(c, s, g, Gs.data()[i * ldg + j], 2 * tol, unit, where);
      }
  }
}

// ----- sqnorm --------------------------------------------------------------------------------
template <class T>
void test_sqnorm(Ctx& c, Rng& rng, size_t n, size_t d) {
  const KernelsT<T>& k = half<T>(*c.k);
  const KernelsT<T>& ks = half<T>(*c.serial);
  const size_t ldx = d + 3;
  std::vector<T> X(n * ldx, T(1e3));  // gap values would show in the sum
  for (size_t i = 0; i < n; ++i)
    for (size_t p = 0; p < d; ++p) X[i * ldx + p] = rng.val<T>();
  Out<T> o(n), os(n);
  k.sqnorm(X.data(), ldx, n, d, o.data());
  ks.sqnorm(X.data(), ldx, n, d, os.data());
  Stat& s = c.stat(fmt("sqnorm %s", Tr<T>::name()));
  if (!o.guards_ok(n)) c.fail(fmt("sqnorm: wrote outside out, n=%zu d=%zu", n, d));
  for (size_t i = 0; i < n; ++i) {
    double ref = 0;
    for (size_t p = 0; p < d; ++p) ref += double(X[i * ldx + p]) * X[i * ldx + p];
    const double unit = Tr<T>::u * ref;
    const double tol = ref_factor<T>() * (d + 2) * unit + Tr<T>::tiny;
    const T g = o.data()[i];
    s.mix(g);
    const std::string where = fmt("n=%zu d=%zu i=%zu", n, d, i);
    if (!check(c, s, g, ref, tol, unit, where)) return;
    check_xlev(c, s, g, os.data()[i], 2 * tol, unit, where);
  }
}

// ----- softmin -------------------------------------------------------------------------------
// C: costs >= 0 (as squared distances / cosine costs are), h: potentials / eps + log weights,
// with -inf entries (zero weights) when ninf_every > 0. Padding columns (up to round_up(m, 16))
// hold h = -inf and C = large finite values or +inf, as the contract allows any readable value.
template <class T>
void test_softmin(Ctx& c, Rng& rng, size_t n, size_t m, double inv_eps_d, size_t ninf_every) {
  const KernelsT<T>& k = half<T>(*c.k);
  const KernelsT<T>& ks = half<T>(*c.serial);
  const T ninf = -std::numeric_limits<T>::infinity();
  const size_t ldc = round_up(m, 16) + 16;
  std::vector<T> C(n * ldc), h(round_up(m, 16) + 16, ninf);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < ldc; ++j) {
      const double v = rng.range(0.0, 4.0);
      C[i * ldc + j] = j < m ? static_cast<T>(v) : ((j & 1) ? std::numeric_limits<T>::infinity() : T(1e30));
    }
  for (size_t j = 0; j < m; ++j) {
    const double v = rng.range(-3.0, 3.0) * (1.0 + 0.5 * inv_eps_d);  // potentials scale with 1/eps
    h[j] = static_cast<T>(v);
    if (ninf_every && j % ninf_every == ninf_every - 1 && j + 1 < m) h[j] = ninf;
  }
  const T inv = static_cast<T>(inv_eps_d);
  const double eps = 1.0 / inv_eps_d;
  Out<double> o(n), os(n);
  k.softmin(C.data(), ldc, n, m, h.data(), inv, eps, o.data());
  ks.softmin(C.data(), ldc, n, m, h.data(), inv, eps, os.data());
  Stat& s = c.stat(fmt("softmin %s", Tr<T>::name()));
  if (!o.guards_ok(n)) c.fail(fmt("softmin: wrote outside out, n=%zu m=%zu", n, m));
  const double u = Tr<T>::u, E = exp_err<T>();
  const size_t W = 16;  // mp <= round_up(m, 16) for every level
  std::vector<double> a(m);
  for (size_t i = 0; i < n; ++i) {
    double M = -INFINITY;
    for (size_t j = 0; j < m; ++j) {
      a[j] = double(h[j]) - double(C[i * ldc + j]) * double(inv);  // exact for float32
      if (a[j] > M) M = a[j];
    }
    double S = 0;
    for (size_t j = 0; j < m; ++j) S += std::exp(a[j] - M);
    const double L = M + std::log(S);
    const double ref = -eps * L;
    double werr = 0;
    for (size_t j = 0; j < m; ++j) {
      if (std::isinf(a[j])) continue;
      const double w = std::exp(a[j] - M) / S;
      const double e = u * (2 * std::fabs(double(C[i * ldc + j]) * double(inv)) + std::fabs(double(h[j]))) +
                       u * std::fabs(a[j] - M);
      werr += w * e * 1.01;
    }
    const double bound = werr + E + (m + 2) * u + round_up(m, W) * exp_floor<T>();
    const double tol = ref_factor<T>() * (eps * bound + 4 * kU64 * eps * (std::fabs(M) + std::fabs(L) + 1));
    const double unit = u * eps;
    const double g = o.data()[i];
    s.mix(g);
    const std::string where = fmt("n=%zu m=%zu inv_eps=%g i=%zu", n, m, inv_eps_d, i);
    if (!check(c, s, g, ref, tol, unit, where)) return;
    check_xlev(c, s, g, os.data()[i], 2 * tol, unit, where);
  }
}

// A row whose entries are all -inf (every target weight zero): the exact soft-min is +inf. The
// driver never builds such a row (weights are positive after validation), and the kernel has no
// special path for it: report what each level returns (not a failure), and require only that the
// other rows of the same call are unaffected.
template <class T>
std::string softmin_all_ninf(Ctx& c) {
  const KernelsT<T>& k = half<T>(*c.k);
  const T ninf = -std::numeric_limits<T>::infinity();
  const size_t m = 5, ldc = 32;
  std::vector<T> C(2 * ldc, T(1)), h(ldc, ninf);
  std::vector<T> h2(ldc, ninf);
  h2[2] = T(0.5);
  double out[2], out2[2];
  k.softmin(C.data(), ldc, 2, m, h.data(), T(2), 0.5, out);
  k.softmin(C.data(), ldc, 2, m, h2.data(), T(2), 0.5, out2);
  // h2: only entry 2 finite: out = -eps (0.5 - 1 * 2) = 0.75 exactly up to exp(0) = 1 and log 1.
  for (double v : out2)
    if (!(std::fabs(v - 0.75) <= 1e-6)) c.fail(fmt("softmin %s single finite entry: got %g want 0.75", Tr<T>::name(), v));
  return fmt("%s: %g", Tr<T>::name(), out[0]);
}

// ----- ksum ----------------------------------------------------------------------------------
template <class T>
void test_ksum(Ctx& c, Rng& rng, size_t n, size_t m, int kind, const std::vector<T>& params) {
  const KernelsT<T>& k = half<T>(*c.k);
  const KernelsT<T>& ks = half<T>(*c.serial);
  const size_t ldd = m + 2, np = params.size();
  std::vector<T> D(n * ldd, T(-1e30));  // gap values would show
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j) {
      double v = rng.range(0.0, 8.0);
      const std::uint64_t r = rng.next() % 16;
      if (r == 0) v = 0.0;                                        // self pairs
      if (r == 1 && kind != metalora::distances::kMultiscale) v = -rng.uniform() * 1e-6;  // cancellation
      if (r == 2) v = rng.range(100.0, 1e4);                      // far pairs (rbf underflows)
      D[i * ldd + j] = static_cast<T>(v);
    }
  Out<double> o(n), os(n);
  k.ksum(D.data(), ldd, n, m, kind, params.data(), np, o.data());
  ks.ksum(D.data(), ldd, n, m, kind, params.data(), np, os.data());
  static const char* kn[] = {"rbf", "multiscale", "sqrt"};
  Stat& s = c.stat(fmt("ksum %s %s", kn[kind], Tr<T>::name()));
  if (!o.guards_ok(n)) c.fail(fmt("%s: wrote outside out, n=%zu m=%zu", s.name.c_str(), n, m));
  const double u = Tr<T>::u, E = exp_err<T>();
  double amax = 0;
  for (T p : params) amax = std::fmax(amax, double(p));
  for (size_t i = 0; i < n; ++i) {
    double ref = 0, terr = 0;
    for (size_t j = 0; j < m; ++j) {
      const double Dv = D[i * ldd + j];
      double kv = 0;
      if (kind == metalora::distances::kRbf) {
        for (T g : params) {
          const double arg = -double(g) * Dv;
          const double e = std::exp(arg);
          kv += e;
          terr += e * (u * std::fabs(arg) + E) + exp_floor<T>();
        }
      } else if (kind == metalora::distances::kMultiscale) {
        for (T a : params) kv += double(a) / (double(a) + Dv);
        const bool frac = sizeof(T) == 8 && np <= 5;
        terr += kv * (frac ? (4.0 * np + 4) * u : 2 * u) + (frac && Dv > 1e60 ? np * amax * 1e-60 : 0.0);
      } else {
        kv = std::sqrt(std::fmax(Dv, 0.0));
        terr += kv * u;
      }
      ref += kv;
    }
    const double unit = u * ref;
    const double tol = ref_factor<T>() * (terr + (np + m + 2) * u * ref) + Tr<T>::tiny;
    const double g = o.data()[i];
    s.mix(g);
    const std::string where = fmt("n=%zu m=%zu np=%zu i=%zu", n, m, np, i);
    if (!check(c, s, g, ref, tol, unit, where)) return;
    check_xlev(c, s, g, os.data()[i], 2 * tol, unit, where);
  }
}

// ----- vexp sweep (through ksum: rbf, one parameter 1, one column per row) ---------------------
// out[i] = vexp(fl(-1 * D_i)) = vexp(-D_i) exactly. Checks the < 2 ulp claim on [lo, 0] (and a
// bit above 0), the clamp below lo, and -inf; records the worst ulp error.
template <class T>
void test_exp(Ctx& c, Rng& rng) {
  const KernelsT<T>& k = half<T>(*c.k);
  std::vector<double> xs;
  const double lo = Tr<T>::exp_lo;
  const int N = 60000;
  for (int i = 0; i <= N; ++i) xs.push_back(lo - 40.0 + (40.0 - lo + 5.0) * i / N);  // [lo-40, 5]
  for (int kk = -1030; kk <= 8; ++kk)  // worst |r|: x near (kk + 1/2) ln 2
    for (double e : {-1e-7, 0.0, 1e-7}) xs.push_back((kk + 0.5) * 0.69314718055994530942 + e);
  for (int i = 0; i < 20000; ++i) {  // small |x|; two draws, sequenced (same inputs everywhere)
    const double mant = 1.0 + rng.uniform();
    const int e = -int(rng.next() % 40);
    xs.push_back(-std::ldexp(mant, e));
  }
  for (double v : {0.0, -0.0, 1e-30, -1e-30, lo, lo + 1e-3, lo - 1e-3, -1e4, -1e300})
    xs.push_back(v);
  xs.push_back(-INFINITY);
  std::vector<T> D;  // ksum computes exp(-1 * D) = exp(x)
  for (double x : xs) D.push_back(-static_cast<T>(x));
  const size_t n = D.size();
  Out<double> o(n);
  const T one = T(1);
  k.ksum(D.data(), 1, n, 1, metalora::distances::kRbf, &one, 1, o.data());
  Stat& s = c.stat(fmt("exp %s", Tr<T>::name()));
  if (!o.guards_ok(n)) c.fail(fmt("exp %s: ksum wrote outside out", Tr<T>::name()));
  const int p = sizeof(T) == 4 ? 24 : 53;
  double& worst_ulp = c.exp_ulp[sizeof(T) == 4 ? 0 : 1];
  int reported = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = -double(D[i]);
    const double g = o.data()[i];
    s.mix(g);
    ++s.checks;
    const std::string where = fmt("x=%.17g", x);
    if (x < double(static_cast<T>(lo))) {  // clamped region (and -inf)
      if (!(g >= 0.0 && g <= exp_floor<T>())) {
        if (reported++ < 3) c.fail(fmt("exp %s: %s got %.17g, want in [0, %.3g]", Tr<T>::name(), where.c_str(), g, exp_floor<T>()));
      }
      continue;
    }
    const double ref = std::exp(x);
    // ulp of ref in T: 2^(floor(log2 ref) - p + 1), normal range only (x >= lo keeps it normal).
    int e2;
    std::frexp(ref, &e2);
    const double ulp = std::ldexp(1.0, e2 - 1 - p + 1);
    const double err = std::fabs(g - ref) / ulp;
    if (err > worst_ulp) worst_ulp = err;
    // float64: the reference (glibc exp) is itself off by up to ~0.5 ulp.
    const double tol_ulp = sizeof(T) == 4 ? 2.0 : 2.5;
    if (!(err <= tol_ulp)) {
      if (reported++ < 3) c.fail(fmt("exp %s: %s got %.17g ref %.17g err %.3f ulp", Tr<T>::name(), where.c_str(), g, ref, err));
    }
    if (err > s.worst) s.worst = err;
    if (err / tol_ulp > s.worst_tol) s.worst_tol = err / tol_ulp;
  }
}

// ----- end to end: the driver's Sinkhorn solve on tiny clouds ---------------------------------
// Plain log-domain Sinkhorn in float64 (alternating exact soft-min updates, no annealing, no
// over-relaxation) to convergence; returns <a, f> + <b, g>, the entropic OT value OT_eps.
double ref_sinkhorn(const std::vector<double>& X, size_t n, const std::vector<double>& Y, size_t m,
                    size_t d, const std::vector<double>& a, const std::vector<double>& b, double eps) {
  std::vector<double> C(n * m), f(n, 0.0), g(m, 0.0);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j) {
      double s = 0;
      for (size_t p = 0; p < d; ++p) s += (X[i * d + p] - Y[j * d + p]) * (X[i * d + p] - Y[j * d + p]);
      C[i * m + j] = s;
    }
  auto smin = [&](size_t rows, size_t cols, bool tr, const std::vector<double>& pot,
                  const std::vector<double>& w, std::vector<double>& out) {
    for (size_t i = 0; i < rows; ++i) {
      double M = -INFINITY;
      std::vector<double> v(cols);
      for (size_t j = 0; j < cols; ++j) {
        v[j] = std::log(w[j]) + (pot[j] - (tr ? C[j * m + i] : C[i * m + j])) / eps;
        M = std::fmax(M, v[j]);
      }
      double S = 0;
      for (size_t j = 0; j < cols; ++j) S += std::exp(v[j] - M);
      out[i] = -eps * (M + std::log(S));
    }
  };
  std::vector<double> f0(n);
  for (int it = 0; it < 20000; ++it) {  // until f stops moving (a fixed point in float64)
    f0 = f;
    smin(n, m, false, g, b, f);
    smin(m, n, true, f, a, g);
    double dmax = 0;
    for (size_t i = 0; i < n; ++i) dmax = std::fmax(dmax, std::fabs(f[i] - f0[i]));
    if (dmax <= 1e-15) break;
  }
  double ot = 0;
  for (size_t i = 0; i < n; ++i) ot += a[i] * f[i];
  for (size_t j = 0; j < m; ++j) ot += b[j] * g[j];
  return ot;
}

// sinkhorn<T> through the active level on clouds of n = 5, m = 7 points in d = 3 (and n = 19,
// m = 33, d = 2 with one zero weight), eps = 0.5: compares OT(P, Q), OT(P, P), OT(Q, Q) with the
// float64 reference (iterated to a float64 fixed point). The solver stops at an L1 marginal
// error of opt.tol (1e-6 float32, 1e-11 float64) and reports the dual value of a pair with one
// exact marginal, which is stationary at the optimum: its error is second order in the
// potentials' error, well below tol (1 + |OT|); the kernels' rounding (costs <= 16, a few
// hundred soft-min passes, each within a few u of exact) stays well below 64 u (1 + |OT|).
// Tolerance: (tol + 64 u) (1 + |OT|); reported in units of u (1 + |OT|).
template <class T>
void test_sinkhorn(Ctx& c, Rng& rng, size_t n, size_t m, size_t d, bool zero_weight) {
  std::vector<double> X(n * d), Y(m * d), a(n, 1.0 / n), b(m, 1.0 / m);
  std::vector<T> Xt(n * d), Yt(m * d);
  for (size_t i = 0; i < n * d; ++i) { Xt[i] = static_cast<T>(rng.range(-1.0, 1.0)); X[i] = Xt[i]; }
  for (size_t i = 0; i < m * d; ++i) { Yt[i] = static_cast<T>(rng.range(-0.5, 1.5)); Y[i] = Yt[i]; }
  if (zero_weight) {  // b_0 = 0: h = -inf entries in the driver's soft-min
    b[0] = 0.0;
    for (size_t j = 1; j < m; ++j) b[j] = 1.0 / (m - 1);
  }
  metalora::distances::SinkhornOptions opt;
  opt.eps = 0.5;
  opt.tol = sizeof(T) == 4 ? 1e-6 : 1e-11;
  opt.max_iter = 5000;
  opt.threads = 1;
  const auto r = metalora::distances::sinkhorn<T>(Xt.data(), n, Yt.data(), m, d, a.data(), b.data(), opt);
  const double rxy = ref_sinkhorn(X, n, Y, m, d, a, b, opt.eps);
  const double rxx = ref_sinkhorn(X, n, X, n, d, a, a, opt.eps);
  const double ryy = ref_sinkhorn(Y, m, Y, m, d, b, b, opt.eps);
  Stat& s = c.stat(fmt("sinkhorn %s", Tr<T>::name()));
  const double rel = opt.tol + 64.0 * Tr<T>::u;
  const double got[3] = {r.ot_xy, r.ot_xx, r.ot_yy}, ref[3] = {rxy, rxx, ryy};
  static const char* what[3] = {"OT(P,Q)", "OT(P,P)", "OT(Q,Q)"};
  for (int k = 0; k < 3; ++k) {
    const double tol = rel * (1.0 + std::fabs(ref[k]));
    s.mix(got[k]);
    check(c, s, got[k], ref[k], tol, Tr<T>::u * (1.0 + std::fabs(ref[k])), fmt("%s n=%zu m=%zu d=%zu converged=%d", what[k], n, m, d, int(r.converged)));
  }
}

const size_t kNM[] = {1, 3, 7, 17, 33, 49, 129};
const size_t kD[] = {1, 3, 7, 17, 33, 129, 384};

template <class T>
void run_dtype(Ctx& c, Rng& rng) {
  // pack + gram: n, m over kNM, d rotated so every (n, d) and (m, d) pair appears; plus larger
  // shapes across the driver's 48-row blocks and d = 383..385.
  size_t t = 0;
  for (size_t n : kNM)
    for (size_t m : kNM) {
      test_gram<T>(c, rng, n, m, kD[t % 7]);
      test_gram<T>(c, rng, n, m, kD[(t + 3) % 7]);
      ++t;
    }
  test_gram<T>(c, rng, 97, 130, 385);
  test_gram<T>(c, rng, 50, 33, 383);
  test_gram<T>(c, rng, 129, 257, 17);
  for (size_t n : {size_t(1), size_t(3), size_t(17), size_t(129)})
    for (size_t d : {size_t(1), size_t(2), size_t(3), size_t(4), size_t(7), size_t(8), size_t(9), size_t(15),
                     size_t(16), size_t(17), size_t(31), size_t(33), size_t(129), size_t(384), size_t(385)})
      test_sqnorm<T>(c, rng, n, d);
  for (size_t n : {size_t(1), size_t(3), size_t(17), size_t(33)})
    for (size_t m : {size_t(1), size_t(2), size_t(3), size_t(7), size_t(8), size_t(15), size_t(16), size_t(17),
                     size_t(31), size_t(33), size_t(129), size_t(384), size_t(385)})
      for (double inv : {1.0, 20.0, 3000.0})  // 3000: most terms underflow the clamp
        for (size_t ninf : {size_t(0), size_t(3)}) test_softmin<T>(c, rng, n, m, inv, ninf);
  using metalora::distances::kMultiscale;
  using metalora::distances::kRbf;
  using metalora::distances::kSqrt;
  const std::vector<T> rbf1{T(0.5)}, rbf4{T(0.01), T(0.3), T(2.0), T(40.0)}, ms1{T(0.25)},
      ms5{T(0.01), T(0.1), T(1.0), T(10.0), T(100.0)}, ms6{T(0.02), T(0.2), T(0.7), T(2.0), T(20.0), T(200.0)},
      none{};
  for (size_t n : {size_t(1), size_t(3), size_t(17)})
    for (size_t m : {size_t(1), size_t(3), size_t(7), size_t(8), size_t(17), size_t(33), size_t(129), size_t(385)}) {
      test_ksum<T>(c, rng, n, m, kRbf, rbf1);
      test_ksum<T>(c, rng, n, m, kRbf, rbf4);
      test_ksum<T>(c, rng, n, m, kMultiscale, ms1);
      test_ksum<T>(c, rng, n, m, kMultiscale, ms5);
      test_ksum<T>(c, rng, n, m, kMultiscale, ms6);
      test_ksum<T>(c, rng, n, m, kSqrt, none);
    }
  test_exp<T>(c, rng);
  metalora::set_active_isa(c.isa);  // the driver uses the active level's table
  test_sinkhorn<T>(c, rng, 5, 7, 3, false);
  test_sinkhorn<T>(c, rng, 19, 33, 2, true);
}

}  // namespace

int main() {
  metalora_test::print_levels("metalora distance kernel test");
  long total_failures = 0;
  const Kernels* serial = metalora::distances::kernels_for(Isa::kSerial);
  for (Isa isa : metalora::available_isas()) {
    Ctx c{{isa, metalora::distances::kernels_for(isa), serial, 0, {}}};
    if (!c.k || !serial) {
      std::printf("[%s] FAIL: kernels_for returned nullptr\n", metalora::isa_name(isa));
      ++total_failures;
      continue;
    }
    Rng rng(0x64697374616e6365ull);  // same inputs for every level
    run_dtype<float>(c, rng);
    run_dtype<double>(c, rng);
    const std::string ninf = softmin_all_ninf<float>(c) + ", " + softmin_all_ninf<double>(c);
    metalora_test::print_level_report(c, 20, 7);
    std::printf("    nr: f32 %zu, f64 %zu; vexp worst error: f32 %.3f ulp, f64 %.3f ulp (exp rows report ulp)\n",
                c.k->f32.nr, c.k->f64.nr, c.exp_ulp[0], c.exp_ulp[1]);
    std::printf("    softmin of an all -inf row (exact: +inf; informational): %s\n", ninf.c_str());
    total_failures += c.failures;
  }
  metalora_test::print_skipped_levels();
  std::printf("%s\n", total_failures ? "DISTANCE KERNEL TEST FAILED" : "distance kernel test passed");
  return total_failures ? 1 : 0;
}
