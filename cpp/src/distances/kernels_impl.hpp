// Generic bodies of the distance kernels, written once over a vector-traits class V.
//
// Each instruction-set file (kernels_serial.cpp, kernels_avx2.cpp, ...) includes that level's
// shared vector traits (cpp/src/simd/vec_<isa>.hpp: VecF32, VecF64) and then this file inside an
// anonymous namespace, so every instantiation has internal linkage and is compiled with that
// file's target flags only (no ODR mixing of AVX-512 code into the baseline build). This file
// includes no standard headers and uses compiler builtins only.
//
// V is dk::Tiled<VecF32 or VecF64, MR, NRV>: the level's traits, which provide T (lane type),
// R (register), W (lanes), zero, set1, load, store, add, sub, mul, div, fma (a * b + c, one
// rounding where the level has FMA), max, min, sqrt; kLibm = true when the level computes exp
// with the C library one lane at a time (the serial oracle: V::exp, and no exp2i), otherwise
// exp2i(t) = 2^(bits(t) - bits(magic)) for the exponent trick of the vectorised exp below (and no
// V::exp); plus this family's tiling of the GEMM micro-kernel for the level: MR (rows), NRV
// (vectors of columns).

using std::size_t;

namespace dk {

// A level's shared vector traits plus the GEMM micro-kernel tile this family uses on it.
template <class Vec, size_t kMR, size_t kNRV>
struct Tiled : Vec {
  static constexpr size_t MR = kMR, NRV = kNRV;
};

using metalora::distances::kMultiscale;
using metalora::distances::kRbf;
using metalora::distances::kSqrt;

template <class T>
struct ExpConst;

// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite split
// of ln 2), exp(r) by its Taylor polynomial: degree 7 for float (truncation < 6e-9 relative),
// degree 13 for double (< 2e-16). The input is clamped to the normal range, so exp(-inf) returns
// the smallest normal number (harmless in the sums below, which are >= 1 or compared to 0 via a
// relative tolerance) and never NaN.
template <>
struct ExpConst<float> {
  static constexpr float lo = -87.3f, hi = 88.3f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float ln2hi = 0.693359375f, ln2lo = -2.12194440e-4f;
  static constexpr int degree = 7;
};
template <>
struct ExpConst<double> {
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2hi = 6.93147180369123816490e-01, ln2lo = 1.90821492927058770002e-10;
  static constexpr int degree = 13;
};

template <class V>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using E = ExpConst<T>;
  if constexpr (V::kLibm) {
    return V::exp(x);
  } else {
    x = V::min(V::max(x, V::set1(E::lo)), V::set1(E::hi));
    const typename V::R t = V::fma(x, V::set1(E::log2e), V::set1(E::magic));
    const typename V::R n = V::sub(t, V::set1(E::magic));
    typename V::R r = V::fma(n, V::set1(-E::ln2hi), x);
    r = V::fma(n, V::set1(-E::ln2lo), r);
    // Horner with 1/k! coefficients, highest degree first.
    T inv_fact[E::degree + 1];
    inv_fact[0] = T(1);
    for (int k = 1; k <= E::degree; ++k) inv_fact[k] = inv_fact[k - 1] / T(k);
    typename V::R p = V::set1(inv_fact[E::degree]);
#pragma GCC unroll 16
    for (int k = E::degree - 1; k >= 0; --k) p = V::fma(p, r, V::set1(inv_fact[k]));
    return V::mul(p, V::exp2i(t));
  }
}

template <class V>
inline double hsum(typename V::R v) {
  alignas(64) typename V::T buf[V::W];
  V::store(buf, v);
  double s = 0.0;
  for (size_t k = 0; k < V::W; ++k) s += static_cast<double>(buf[k]);
  return s;
}

template <class V>
inline typename V::T hmax(typename V::R v) {
  alignas(64) typename V::T buf[V::W];
  V::store(buf, v);
  typename V::T m = buf[0];
  for (size_t k = 1; k < V::W; ++k) m = buf[k] > m ? buf[k] : m;
  return m;
}

// ---------------------------------------------------------------------------------------------
// GEMM-shaped kernels: G = epilogue(X . Y^T), Y packed into panels of NR = NRV * W columns.

template <class V>
void pack_impl(const typename V::T* Y, size_t ldy, size_t m, size_t d, typename V::T* Yp) {
  constexpr size_t NR = V::NRV * V::W;
  for (size_t jb = 0; jb < m; jb += NR) {
    typename V::T* P = Yp + (jb / NR) * NR * d;
    for (size_t c = 0; c < NR; ++c) {
      if (jb + c < m) {
        const typename V::T* y = Y + (jb + c) * ldy;
        for (size_t p = 0; p < d; ++p) P[p * NR + c] = y[p];
      } else {
        for (size_t p = 0; p < d; ++p) P[p * NR + c] = typename V::T(0);
      }
    }
  }
}

template <class V>
void gram_impl(const typename V::T* X, size_t ldx, size_t n, const typename V::T* Yp, size_t m,
               size_t d, typename V::T alpha, const typename V::T* xn, const typename V::T* yn,
               typename V::T lo, typename V::T* G, size_t ldg) {
  using T = typename V::T;
  using R = typename V::R;
  constexpr size_t MR = V::MR, NRV = V::NRV, W = V::W, NR = NRV * W;
  T* xp = static_cast<T*>(::operator new(sizeof(T) * MR * (d ? d : 1)));
  const R valpha = V::set1(alpha), vlo = V::set1(lo);
  alignas(64) T tmp[NR];
  alignas(64) T ynb[NR];
  for (size_t i0 = 0; i0 < n; i0 += MR) {
    const size_t mr = n - i0 < MR ? n - i0 : MR;
    // Interleave MR rows of X: xp[p * MR + r] = X[i0 + r, p] (zero rows past n).
    for (size_t r = 0; r < MR; ++r) {
      if (r < mr) {
        const T* x = X + (i0 + r) * ldx;
        for (size_t p = 0; p < d; ++p) xp[p * MR + r] = x[p];
      } else {
        for (size_t p = 0; p < d; ++p) xp[p * MR + r] = T(0);
      }
    }
    for (size_t jb = 0; jb < m; jb += NR) {
      const T* P = Yp + (jb / NR) * NR * d;
      R acc[MR][NRV];
#pragma GCC unroll 16
      for (size_t r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (size_t v = 0; v < NRV; ++v) acc[r][v] = V::zero();
      for (size_t p = 0; p < d; ++p) {
        R y[NRV];
#pragma GCC unroll 4
        for (size_t v = 0; v < NRV; ++v) y[v] = V::load(P + p * NR + v * W);
        const T* xr = xp + p * MR;
#pragma GCC unroll 16
        for (size_t r = 0; r < MR; ++r) {
          const R b = V::set1(xr[r]);
#pragma GCC unroll 4
          for (size_t v = 0; v < NRV; ++v) acc[r][v] = V::fma(b, y[v], acc[r][v]);
        }
      }
      const size_t nc = m - jb < NR ? m - jb : NR;
      for (size_t c = 0; c < NR; ++c) ynb[c] = (yn && c < nc) ? yn[jb + c] : T(0);
      for (size_t r = 0; r < mr; ++r) {
        const R xv = V::set1(xn ? xn[i0 + r] : T(0));
        T* g = G + (i0 + r) * ldg + jb;
#pragma GCC unroll 4
        for (size_t v = 0; v < NRV; ++v) {
          const R e = V::max(vlo, V::add(V::fma(valpha, acc[r][v], xv), V::load(ynb + v * W)));
          if (nc == NR) {
            V::store(g + v * W, e);
          } else {
            V::store(tmp + v * W, e);
          }
        }
        if (nc != NR)
          for (size_t c = 0; c < nc; ++c) g[c] = tmp[c];
      }
    }
  }
  ::operator delete(xp);
}

template <class V>
void sqnorm_impl(const typename V::T* X, size_t ldx, size_t n, size_t d, typename V::T* out) {
  using T = typename V::T;
  using R = typename V::R;
  constexpr size_t W = V::W;
  alignas(64) T buf[W];
  for (size_t i = 0; i < n; ++i) {
    const T* x = X + i * ldx;
    R acc = V::zero();
    size_t k = 0;
    for (; k + W <= d; k += W) {
      const R v = V::load(x + k);
      acc = V::fma(v, v, acc);
    }
    if (k < d) {
      for (size_t t = 0; t < W; ++t) buf[t] = k + t < d ? x[k + t] : T(0);
      const R v = V::load(buf);
      acc = V::fma(v, v, acc);
    }
    out[i] = static_cast<T>(hsum<V>(acc));
  }
}

// ---------------------------------------------------------------------------------------------
// Log-domain soft-min of rows: two passes over a row that stays in L1 (max, then sum of exp).

template <class V>
void softmin_impl(const typename V::T* C, size_t ldc, size_t n, size_t m, const typename V::T* h,
                  typename V::T inv_eps, double eps, double* out) {
  using T = typename V::T;
  using R = typename V::R;
  constexpr size_t W = V::W;
  const size_t mp = (m + W - 1) / W * W;
  const R ninv = V::set1(-inv_eps);
  const R ninf = V::set1(-__builtin_inf());
  for (size_t i = 0; i < n; ++i) {
    const T* c = C + i * ldc;
    R m0 = ninf, m1 = ninf;
    size_t j = 0;
    for (; j + 2 * W <= mp; j += 2 * W) {
      m0 = V::max(m0, V::fma(V::load(c + j), ninv, V::load(h + j)));
      m1 = V::max(m1, V::fma(V::load(c + j + W), ninv, V::load(h + j + W)));
    }
    if (j < mp) m0 = V::max(m0, V::fma(V::load(c + j), ninv, V::load(h + j)));
    const T M = hmax<V>(V::max(m0, m1));
    const R vM = V::set1(M);
    R s0 = V::zero(), s1 = V::zero();
    j = 0;
    for (; j + 2 * W <= mp; j += 2 * W) {
      s0 = V::add(s0, vexp<V>(V::sub(V::fma(V::load(c + j), ninv, V::load(h + j)), vM)));
      s1 = V::add(s1, vexp<V>(V::sub(V::fma(V::load(c + j + W), ninv, V::load(h + j + W)), vM)));
    }
    if (j < mp) s0 = V::add(s0, vexp<V>(V::sub(V::fma(V::load(c + j), ninv, V::load(h + j)), vM)));
    out[i] = -eps * (static_cast<double>(M) + __builtin_log(hsum<V>(V::add(s0, s1))));
  }
}

// ---------------------------------------------------------------------------------------------
// Fused kernel sums over rows of a squared-distance block.

template <class V, int Kind>
inline typename V::R kvalue(typename V::R D, const typename V::T* params, size_t np) {
  using R = typename V::R;
  if constexpr (Kind == kRbf) {
    R acc = V::zero();
    for (size_t q = 0; q < np; ++q) acc = V::add(acc, vexp<V>(V::mul(V::set1(-params[q]), D)));
    return acc;
  } else if constexpr (Kind == kMultiscale) {
    if constexpr (sizeof(typename V::T) == 8) {
      if (np <= 5) {
        // float64: one division for all terms, sum_q a_q / (a_q + D) = num / den accumulated as
        // fractions (divisions are the slow instruction here: 4x fewer). D is capped at 1e60,
        // where every term is below 1e-60 relative to its scale, so den <= 1e300 is finite.
        const R Dc = V::min(D, V::set1(typename V::T(1e60)));
        R num = V::zero(), den = V::set1(typename V::T(1));
        for (size_t q = 0; q < np; ++q) {
          const R a = V::set1(params[q]);
          const R t = V::add(a, Dc);
          num = V::fma(num, t, V::mul(a, den));
          den = V::mul(den, t);
        }
        return V::div(num, den);
      }
    }
    R acc = V::zero();
    for (size_t q = 0; q < np; ++q) {
      const R a = V::set1(params[q]);
      acc = V::add(acc, V::div(a, V::add(a, D)));
    }
    return acc;
  } else {
    return V::sqrt(V::max(D, V::zero()));
  }
}

template <class V, int Kind>
void ksum_kind(const typename V::T* D, size_t ldd, size_t n, size_t m,
               const typename V::T* params, size_t np, double* out) {
  using T = typename V::T;
  using R = typename V::R;
  constexpr size_t W = V::W;
  alignas(64) T buf[W];
  for (size_t i = 0; i < n; ++i) {
    const T* row = D + i * ldd;
    R a0 = V::zero(), a1 = V::zero();
    size_t j = 0;
    for (; j + 2 * W <= m; j += 2 * W) {
      a0 = V::add(a0, kvalue<V, Kind>(V::load(row + j), params, np));
      a1 = V::add(a1, kvalue<V, Kind>(V::load(row + j + W), params, np));
    }
    for (; j + W <= m; j += W) a0 = V::add(a0, kvalue<V, Kind>(V::load(row + j), params, np));
    double tail = 0.0;
    if (j < m) {
      const size_t t = m - j;
      for (size_t k = 0; k < W; ++k) buf[k] = k < t ? row[j + k] : T(0);
      V::store(buf, kvalue<V, Kind>(V::load(buf), params, np));
      for (size_t k = 0; k < t; ++k) tail += static_cast<double>(buf[k]);
    }
    out[i] = hsum<V>(V::add(a0, a1)) + tail;
  }
}

template <class V>
void ksum_impl(const typename V::T* D, size_t ldd, size_t n, size_t m, int kind,
               const typename V::T* params, size_t np, double* out) {
  switch (kind) {
    case kRbf: ksum_kind<V, kRbf>(D, ldd, n, m, params, np, out); break;
    case kMultiscale: ksum_kind<V, kMultiscale>(D, ldd, n, m, params, np, out); break;
    default: ksum_kind<V, kSqrt>(D, ldd, n, m, params, np, out); break;
  }
}

template <class V>
constexpr metalora::distances::KernelsT<typename V::T> make_half() {
  return metalora::distances::KernelsT<typename V::T>{
      V::NRV * V::W,    &pack_impl<V>,    &gram_impl<V>, &sqnorm_impl<V>,
      &softmin_impl<V>, &ksum_impl<V>};
}

}  // namespace dk

template <class VF, class VD>
constexpr metalora::distances::Kernels make_kernels() {
  return metalora::distances::Kernels{dk::make_half<VF>(), dk::make_half<VD>()};
}
