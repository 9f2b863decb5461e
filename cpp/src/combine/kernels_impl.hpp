// Generic bodies of the combination kernels, written once over a small vector-traits class V.
//
// Each instruction-set file (kernels_serial.cpp, kernels_avx2.cpp, ...) includes that level's
// shared vector traits (cpp/src/simd/vec_<isa>.hpp: VecF32, VecF64) and then this file inside an
// anonymous namespace, so every instantiation has internal linkage and is compiled with that
// file's target flags only (no ODR mixing of AVX-512 code into the baseline build). This file
// therefore includes no standard headers and uses builtins only.
//
// The float32 kernels take V = VecF32: W (floats per vector), R, zero, set1, load, store,
// load_bf16, load_f16, fma(a, b, c) = a * b + c with one rounding where the level has FMA; the
// float64 ones (syrk, gemm) take V = VecF64: W (doubles per vector), R, zero, set1, load, store,
// fma.

using std::size_t;
using metalora::DType;
using metalora::Src;

template <class V, DType D>
inline typename V::R load_as_f32(const void* p, size_t i) {
  if constexpr (D == DType::kF32) {
    return V::load(static_cast<const float*>(p) + i);
  } else if constexpr (D == DType::kBF16) {
    return V::load_bf16(static_cast<const unsigned short*>(p) + i);
  } else {
    return V::load_f16(static_cast<const unsigned short*>(p) + i);
  }
}

// Loads t < W elements, zero padded, through a small stack buffer: the tail of an array is
// computed by the same vector instructions as its body.
template <class V, DType D>
inline typename V::R load_tail_as_f32(const void* p, size_t i, size_t t) {
  constexpr size_t esz = D == DType::kF32 ? 4 : 2;
  alignas(64) unsigned char buf[V::W * 4] = {};
  __builtin_memcpy(buf, static_cast<const unsigned char*>(p) + i * esz, t * esz);
  return load_as_f32<V, D>(buf, 0);
}

template <class V>
inline void store_tail(float* out, typename V::R v, size_t t) {
  alignas(64) float buf[V::W];
  V::store(buf, v);
  for (size_t k = 0; k < t; ++k) out[k] = buf[k];
}

// out[0:n] = sum_q c[q] * x_q + (First ? 0 : out[0:n]) for Q <= 4 sources, evaluated as the
// chain fma(c[Q-1], x_{Q-1}, ... fma(c[0], x_0, out)): the same bits as Q single-source
// passes, but one read-modify-write of `out` per Q sources and Q concurrent input streams.
template <class V, DType D, bool First, int Q>
inline typename V::R axpy_chain(const void* const* x, const typename V::R* c, size_t i,
                                typename V::R acc) {
  for (int q = 0; q < Q; ++q) acc = V::fma(c[q], load_as_f32<V, D>(x[q], i), acc);
  return acc;
}

template <class V, DType D, bool First, int Q>
inline void axpy(const void* const* x, const float* coef, size_t n, float* out) {
  using F = typename V::R;
  F c[Q];
  for (int q = 0; q < Q; ++q) c[q] = V::set1(coef[q]);
  const F z = V::zero();
  size_t i = 0;
  // Each source is streamed for one block and then left for the others, so the hardware
  // prefetcher (which stops at 4 KB page boundaries) restarts cold on every visit. One software
  // hint per cache line, 2 KB ahead in the same stream, keeps the next lines in flight: 48
  // Mistral-shaped bf16 adapters, one thread, ~148 ms -> ~120 ms (1, 0.5 and 4 KB ahead did no
  // better; prefetching the next run of sources instead was 25 % slower).
  constexpr size_t esz = D == DType::kF32 ? 4 : 2;
  constexpr size_t kAhead = 2048;
  for (; i + 2 * V::W <= n; i += 2 * V::W) {
    if ((i * esz) % 64 == 0)
      for (int q = 0; q < Q; ++q)
        __builtin_prefetch(static_cast<const char*>(x[q]) + i * esz + kAhead, 0, 3);
    F o0 = First ? z : V::load(out + i);
    F o1 = First ? z : V::load(out + i + V::W);
    o0 = axpy_chain<V, D, First, Q>(x, c, i, o0);
    o1 = axpy_chain<V, D, First, Q>(x, c, i + V::W, o1);
    V::store(out + i, o0);
    V::store(out + i + V::W, o1);
  }
  for (; i + V::W <= n; i += V::W) {
    F o = First ? z : V::load(out + i);
    V::store(out + i, axpy_chain<V, D, First, Q>(x, c, i, o));
  }
  if (i < n) {
    const size_t t = n - i;
    alignas(64) float obuf[V::W] = {};
    if (!First) {
      for (size_t k = 0; k < t; ++k) obuf[k] = out[i + k];
    }
    F o = V::load(obuf);
    for (int q = 0; q < Q; ++q) o = V::fma(c[q], load_tail_as_f32<V, D>(x[q], i, t), o);
    store_tail<V>(out + i, o, t);
  }
}

template <class V, bool First, int Q>
inline void axpy_q(const Src* x, const float* coef, size_t off, size_t n, float* out) {
  const void* p[Q];
  for (int q = 0; q < Q; ++q) p[q] = x[q].offset(off).ptr;
  switch (x[0].dt) {
    case DType::kF32: axpy<V, DType::kF32, First, Q>(p, coef, n, out); break;
    case DType::kBF16: axpy<V, DType::kBF16, First, Q>(p, coef, n, out); break;
    case DType::kF16: axpy<V, DType::kF16, First, Q>(p, coef, n, out); break;
  }
}

// One run of up to 4 sources that share a dtype, starting at source p.
template <class V, bool First>
inline size_t axpy_run(const Src* src, size_t nsrc, size_t p, const float* coef, size_t off,
                       size_t n, float* out) {
  size_t q = 1;
  while (q < 4 && p + q < nsrc && src[p + q].dt == src[p].dt) ++q;
  switch (q) {
    case 4: axpy_q<V, First, 4>(src + p, coef + p, off, n, out); break;
    case 3: axpy_q<V, First, 3>(src + p, coef + p, off, n, out); break;
    case 2: axpy_q<V, First, 2>(src + p, coef + p, off, n, out); break;
    default: axpy_q<V, First, 1>(src + p, coef + p, off, n, out); break;
  }
  return q;
}

template <class V, DType D>
inline void widen_block(const void* x, size_t n, float* dst) {
  size_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, load_as_f32<V, D>(x, i));
  if (i < n) store_tail<V>(dst + i, load_tail_as_f32<V, D>(x, i, n - i), n - i);
}

template <class V>
inline void widen_any(Src x, size_t n, float* dst) {
  switch (x.dt) {
    case DType::kF32: widen_block<V, DType::kF32>(x.ptr, n, dst); break;
    case DType::kBF16: widen_block<V, DType::kBF16>(x.ptr, n, dst); break;
    case DType::kF16: widen_block<V, DType::kF16>(x.ptr, n, dst); break;
  }
}

// Columns per block: for m == 1 the output block stays in L1 while every source streams
// through it; for m > 1 the widened sources of one block stay in L1/L2.
constexpr size_t kAxpyBlock = 2048;
constexpr size_t kMixBlock = 128;

template <class V>
void rowmix_impl(const Src* src, size_t nsrc, const float* coef, size_t m, size_t n, float* out,
                 size_t ldo) {
  using F = typename V::R;
  if (nsrc == 0) {
    for (size_t k = 0; k < m; ++k)
      for (size_t i = 0; i < n; ++i) out[k * ldo + i] = 0.0f;
    return;
  }
  if (m == 1) {
    for (size_t b = 0; b < n; b += kAxpyBlock) {
      const size_t nb = n - b < kAxpyBlock ? n - b : kAxpyBlock;
      size_t p = axpy_run<V, true>(src, nsrc, 0, coef, b, nb, out + b);
      while (p < nsrc) p += axpy_run<V, false>(src, nsrc, p, coef, b, nb, out + b);
    }
    return;
  }
  // m > 1: widen a block of every source once, then form the m mixtures from it. Each output
  // element is the same p-ordered chain of FMAs as in the m == 1 path.
  float* buf = static_cast<float*>(::operator new(sizeof(float) * nsrc * kMixBlock));
  for (size_t b = 0; b < n; b += kMixBlock) {
    const size_t nb = n - b < kMixBlock ? n - b : kMixBlock;
    const size_t nbp = (nb + V::W - 1) / V::W * V::W;
    for (size_t p = 0; p < nsrc; ++p) {
      float* row = buf + p * kMixBlock;
      widen_any<V>(src[p].offset(b), nb, row);
      for (size_t i = nb; i < nbp; ++i) row[i] = 0.0f;
    }
    for (size_t k = 0; k < m; ++k) {
      const float* ck = coef + k * nsrc;
      float* ok = out + k * ldo + b;
      size_t j = 0;
      for (; j + 4 * V::W <= nbp; j += 4 * V::W) {
        F a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
        for (size_t p = 0; p < nsrc; ++p) {
          const F c = V::set1(ck[p]);
          const float* row = buf + p * kMixBlock + j;
          a0 = V::fma(c, V::load(row), a0);
          a1 = V::fma(c, V::load(row + V::W), a1);
          a2 = V::fma(c, V::load(row + 2 * V::W), a2);
          a3 = V::fma(c, V::load(row + 3 * V::W), a3);
        }
        F acc[4] = {a0, a1, a2, a3};
        for (size_t q = 0; q < 4; ++q) {
          const size_t col = j + q * V::W;
          if (col + V::W <= nb) V::store(ok + col, acc[q]);
          else if (col < nb) store_tail<V>(ok + col, acc[q], nb - col);
        }
      }
      for (; j < nbp; j += V::W) {
        F a = V::zero();
        for (size_t p = 0; p < nsrc; ++p) a = V::fma(V::set1(ck[p]), V::load(buf + p * kMixBlock + j), a);
        if (j + V::W <= nb) V::store(ok + j, a);
        else store_tail<V>(ok + j, a, nb - j);
      }
    }
  }
  ::operator delete(buf);
}

template <class V>
void scale_to_f32_impl(Src x, float scale, size_t n, float* dst) {
  const typename V::R s = V::set1(scale);
  // The addend is -0, not +0: x + (-0) == x for every x, including x = -0, whereas -0 + (+0) is
  // +0. With +0 the "exact" copy of cat mode (scale 1) turned negative zeros into positive ones.
  const typename V::R z = V::set1(-0.0f);
  size_t i = 0;
  switch (x.dt) {
    case DType::kF32:
      for (; i + V::W <= n; i += V::W) V::store(dst + i, V::fma(s, load_as_f32<V, DType::kF32>(x.ptr, i), z));
      if (i < n) store_tail<V>(dst + i, V::fma(s, load_tail_as_f32<V, DType::kF32>(x.ptr, i, n - i), z), n - i);
      break;
    case DType::kBF16:
      for (; i + V::W <= n; i += V::W) V::store(dst + i, V::fma(s, load_as_f32<V, DType::kBF16>(x.ptr, i), z));
      if (i < n) store_tail<V>(dst + i, V::fma(s, load_tail_as_f32<V, DType::kBF16>(x.ptr, i, n - i), z), n - i);
      break;
    case DType::kF16:
      for (; i + V::W <= n; i += V::W) V::store(dst + i, V::fma(s, load_as_f32<V, DType::kF16>(x.ptr, i), z));
      if (i < n) store_tail<V>(dst + i, V::fma(s, load_tail_as_f32<V, DType::kF16>(x.ptr, i, n - i), z), n - i);
      break;
  }
}

template <class V>
void scale_to_f64_impl(Src x, double scale, size_t n, double* dst) {
  alignas(64) float tmp[V::W];
  for (size_t i = 0; i < n; i += V::W) {
    const size_t t = n - i < V::W ? n - i : V::W;
    typename V::R v;
    switch (x.dt) {
      case DType::kF32: v = t == V::W ? load_as_f32<V, DType::kF32>(x.ptr, i) : load_tail_as_f32<V, DType::kF32>(x.ptr, i, t); break;
      case DType::kBF16: v = t == V::W ? load_as_f32<V, DType::kBF16>(x.ptr, i) : load_tail_as_f32<V, DType::kBF16>(x.ptr, i, t); break;
      default: v = t == V::W ? load_as_f32<V, DType::kF16>(x.ptr, i) : load_tail_as_f32<V, DType::kF16>(x.ptr, i, t); break;
    }
    V::store(tmp, v);
    for (size_t k = 0; k < t; ++k) dst[i + k] = static_cast<double>(tmp[k]) * scale;
  }
}

// G += X^T X for X [n x R] row-major float64, R a multiple of 8. Four rows of G at a time,
// one or two vectors of columns, the t loop innermost with the accumulators in registers.
template <class V>
void syrk_f64_impl(const double* X, size_t n, size_t R, double* G) {
  using D = typename V::R;
  constexpr size_t WD = V::W;
  for (size_t i0 = 0; i0 < R; i0 += 4) {
    const size_t jstart = i0 / WD * WD;
    size_t j = jstart;
    for (; j + 2 * WD <= R; j += 2 * WD) {
      D a00 = V::zero(), a01 = V::zero(), a10 = V::zero(), a11 = V::zero();
      D a20 = V::zero(), a21 = V::zero(), a30 = V::zero(), a31 = V::zero();
      for (size_t t = 0; t < n; ++t) {
        const double* row = X + t * R;
        const D y0 = V::load(row + j), y1 = V::load(row + j + WD);
        const D x0 = V::set1(row[i0]), x1 = V::set1(row[i0 + 1]);
        const D x2 = V::set1(row[i0 + 2]), x3 = V::set1(row[i0 + 3]);
        a00 = V::fma(x0, y0, a00); a01 = V::fma(x0, y1, a01);
        a10 = V::fma(x1, y0, a10); a11 = V::fma(x1, y1, a11);
        a20 = V::fma(x2, y0, a20); a21 = V::fma(x2, y1, a21);
        a30 = V::fma(x3, y0, a30); a31 = V::fma(x3, y1, a31);
      }
      const D acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      for (size_t q = 0; q < 4; ++q) {
        double* g = G + (i0 + q) * R + j;
        V::store(g, V::fma(V::set1(1.0), acc[q][0], V::load(g)));
        V::store(g + WD, V::fma(V::set1(1.0), acc[q][1], V::load(g + WD)));
      }
    }
    for (; j < R; j += WD) {
      D a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      for (size_t t = 0; t < n; ++t) {
        const double* row = X + t * R;
        const D y = V::load(row + j);
        a0 = V::fma(V::set1(row[i0]), y, a0);
        a1 = V::fma(V::set1(row[i0 + 1]), y, a1);
        a2 = V::fma(V::set1(row[i0 + 2]), y, a2);
        a3 = V::fma(V::set1(row[i0 + 3]), y, a3);
      }
      const D acc[4] = {a0, a1, a2, a3};
      for (size_t q = 0; q < 4; ++q) {
        double* g = G + (i0 + q) * R + j;
        V::store(g, V::fma(V::set1(1.0), acc[q], V::load(g)));
      }
    }
  }
}

// Y[t, k] = float(sum_p X[t, p] P[p, k]); P is R x mp, mp a multiple of 8 (zero padded).
template <class V>
void gemm_f64_impl(const double* X, size_t n, size_t R, const double* P, size_t m, size_t mp,
                   float* Y, size_t ldy) {
  using D = typename V::R;
  constexpr size_t WD = V::W;
  alignas(64) double tmp[4 * WD];
  for (size_t t = 0; t < n; ++t) {
    const double* x = X + t * R;
    for (size_t k0 = 0; k0 < mp; k0 += 4 * WD) {
      const size_t nv = (mp - k0) / WD < 4 ? (mp - k0) / WD : 4;
      D a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      for (size_t p = 0; p < R; ++p) {
        const D xp = V::set1(x[p]);
        const double* prow = P + p * mp + k0;
        a0 = V::fma(xp, V::load(prow), a0);
        if (nv > 1) a1 = V::fma(xp, V::load(prow + WD), a1);
        if (nv > 2) a2 = V::fma(xp, V::load(prow + 2 * WD), a2);
        if (nv > 3) a3 = V::fma(xp, V::load(prow + 3 * WD), a3);
      }
      V::store(tmp, a0);
      if (nv > 1) V::store(tmp + WD, a1);
      if (nv > 2) V::store(tmp + 2 * WD, a2);
      if (nv > 3) V::store(tmp + 3 * WD, a3);
      for (size_t k = k0; k < k0 + nv * WD && k < m; ++k) Y[t * ldy + k] = static_cast<float>(tmp[k - k0]);
    }
  }
}

template <class VF, class VD>
constexpr metalora::combine::Kernels make_kernels() {
  return metalora::combine::Kernels{&rowmix_impl<VF>, &scale_to_f32_impl<VF>, &scale_to_f64_impl<VF>,
                                    &syrk_f64_impl<VD>, &gemm_f64_impl<VD>};
}
