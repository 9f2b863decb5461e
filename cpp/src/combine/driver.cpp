// Driver of the combination kernels (parallel on the task pool, common/pool.hpp) (see metalora/combine.hpp). Each run_* takes the
// active level's table once (kernels()) and hands it to every task, so that one call runs at one
// level even when another thread switches the level (set_active_isa) while it runs.
#include "metalora/combine.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <exception>
#include <mutex>
#include <vector>

#include "../common/pool.hpp"
#include "metalora/combine_kernels.hpp"

namespace metalora::combine {

#include "../common/threads_impl.hpp"

namespace {

// Task sizes. Boundaries are multiples of the kernels' own blocks so that a range never
// changes how an element is computed.
constexpr std::size_t kLinearChunk = 1 << 16;  // elements
constexpr std::size_t kCatChunk = 1 << 16;     // elements (A) ...
constexpr std::size_t kRowChunk = 128;         // rows of B / columns of A per Gram block
constexpr std::size_t kProjectCols = 1024;     // columns of A per projection task

std::size_t pad8(std::size_t n) { return (n + 7) / 8 * 8; }

struct Task {
  std::size_t job, side, begin, end;  // side 0 = A, 1 = B
};

template <class F>
void parallel_tasks(const std::vector<Task>& tasks, int threads, F&& body) {
  parallel_for(tasks.size(), threads, [&](std::size_t i) { body(tasks[i]); });
}

void split(std::vector<Task>& tasks, std::size_t job, std::size_t side, std::size_t n,
           std::size_t chunk) {
  for (std::size_t b = 0; b < n; b += chunk) tasks.push_back({job, side, b, std::min(n, b + chunk)});
}

std::vector<std::size_t> offsets(const Job& j) {
  std::vector<std::size_t> off(j.r.size() + 1, 0);
  for (std::size_t k = 0; k < j.r.size(); ++k) off[k + 1] = off[k] + j.r[k];
  return off;
}

// X[t, :] = [cb_1 B_1[o, :], ..., cb_K B_K[o, :], 0 ...] for rows o in [o0, o1); X is n x Rp.
// Rows [o0, o1) of B_j are one contiguous run: widen it in one kernel call (ranks are small, a
// call per row would cost more than the conversion), then place it in X.
void gather_b_rows(const Kernels& k, const Job& j, const std::vector<std::size_t>& off,
                   std::size_t Rp, std::size_t o0, std::size_t o1, double* X) {
  std::fill(X, X + (o1 - o0) * Rp, 0.0);
  std::vector<double> tmp;
  for (std::size_t a = 0; a < j.B.size(); ++a) {
    const std::size_t r = j.r[a];
    tmp.resize((o1 - o0) * r);
    k.scale_to_f64(j.B[a].offset(o0 * r), j.cb[a], tmp.size(), tmp.data());
    for (std::size_t t = 0; t < o1 - o0; ++t)
      std::copy(tmp.data() + t * r, tmp.data() + (t + 1) * r, X + t * Rp + off[a]);
  }
}

// X[t, :] = column c0 + t of A_cat, for columns [c0, c1); X is n x Rp.
void gather_a_cols(const Kernels& k, const Job& j, const std::vector<std::size_t>& off,
                   std::size_t Rp, std::size_t c0, std::size_t c1, double* X,
                   std::vector<double>& tmp) {
  const std::size_t n = c1 - c0;
  std::fill(X, X + n * Rp, 0.0);
  tmp.resize(n);
  for (std::size_t a = 0; a < j.A.size(); ++a)
    for (std::size_t p = 0; p < j.r[a]; ++p) {
      k.scale_to_f64(j.A[a].offset(p * j.in + c0), 1.0, n, tmp.data());
      for (std::size_t t = 0; t < n; ++t) X[t * Rp + off[a] + p] = tmp[t];
    }
}

// Gram of one side of one job over chunks [chunk0, chunk1) of kRowChunk rows, summed in
// chunk order into G (Rp x Rp, zero on entry).
void gram_chunks(const Kernels& k, const Job& j, std::size_t side, std::size_t c0,
                 std::size_t c1, double* G) {
  const auto off = offsets(j);
  const std::size_t Rp = pad8(j.rank_sum());
  const std::size_t n = side == 0 ? j.in : j.out;
  std::vector<double> X(kRowChunk * Rp), P(Rp * Rp), tmp;
  for (std::size_t c = c0; c < c1; ++c) {
    const std::size_t b = c * kRowChunk, e = std::min(n, b + kRowChunk);
    if (side == 0) gather_a_cols(k, j, off, Rp, b, e, X.data(), tmp);
    else gather_b_rows(k, j, off, Rp, b, e, X.data());
    std::fill(P.begin(), P.end(), 0.0);
    k.syrk_f64(X.data(), e - b, Rp, P.data());
    for (std::size_t i = 0; i < Rp * Rp; ++i) G[i] += P[i];
  }
}

// Upper triangle of the padded Rp x Rp Gram -> full symmetric R x R output.
void finish_gram(const double* G, std::size_t Rp, std::size_t R, double* out) {
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t c = i; c < R; ++c) out[i * R + c] = out[c * R + i] = G[i * Rp + c];
}

}  // namespace


// True when x[0:n] holds a NaN or an infinity (exponent bits all ones): a bit test that the
// compiler vectorises at the baseline instruction set.
bool any_nonfinite(const float* x, std::size_t n) {
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t b;
    std::memcpy(&b, x + i, 4);
    bad |= (b & 0x7f800000u) == 0x7f800000u;
  }
  return bad != 0;
}

void run_linear(std::vector<Job>& jobs, int threads) { run_linear_checked(jobs, threads, nullptr); }

void run_linear_checked(std::vector<Job>& jobs, int threads, std::vector<unsigned char>* nonfinite) {
  const Kernels& k = kernels();
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const Job& j = jobs[i];
    const std::size_t r = j.r.empty() ? 0 : j.r[0];
    split(tasks, i, 0, r * j.in, kLinearChunk);
    split(tasks, i, 1, j.out * r, kLinearChunk);
  }
  std::unique_ptr<std::atomic<unsigned char>[]> bad;
  if (nonfinite) {
    bad.reset(new std::atomic<unsigned char>[jobs.size()]);
    for (std::size_t i = 0; i < jobs.size(); ++i) bad[i].store(0, std::memory_order_relaxed);
  }
  parallel_tasks(tasks, resolve_threads(threads), [&](const Task& t) {
    const Job& j = jobs[t.job];
    const auto& srcs = t.side == 0 ? j.A : j.B;
    std::vector<Src> s(srcs.size());
    for (std::size_t a = 0; a < srcs.size(); ++a) s[a] = srcs[a].offset(t.begin);
    std::vector<float> coef = j.wa;
    if (t.side == 1) coef.assign(j.cb.begin(), j.cb.end());
    float* out = (t.side == 0 ? j.A_out : j.B_out) + t.begin;
    k.rowmix(s.data(), s.size(), coef.data(), 1, t.end - t.begin, out, 0);
    // The block is still in cache: check it for NaN/Inf here rather than in a second pass.
    if (bad && any_nonfinite(out, t.end - t.begin)) bad[t.job].store(1, std::memory_order_relaxed);
  });
  if (nonfinite) {
    nonfinite->assign(jobs.size(), 0);
    for (std::size_t i = 0; i < jobs.size(); ++i) (*nonfinite)[i] = bad[i].load(std::memory_order_relaxed);
  }
}

void run_cat(std::vector<Job>& jobs, int threads) {
  const Kernels& k = kernels();
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const Job& j = jobs[i];
    split(tasks, i, 0, j.rank_sum() * j.in, kCatChunk);
    split(tasks, i, 1, j.out, std::max<std::size_t>(1, kCatChunk / std::max<std::size_t>(1, j.rank_sum())));
  }
  parallel_tasks(tasks, resolve_threads(threads), [&](const Task& t) {
    const Job& j = jobs[t.job];
    const auto off = offsets(j);
    if (t.side == 0) {
      // Element range [begin, end) of the stacked A; copy the overlap with each A_j.
      for (std::size_t a = 0; a < j.A.size(); ++a) {
        const std::size_t lo = off[a] * j.in, hi = off[a + 1] * j.in;
        const std::size_t b = std::max(lo, t.begin), e = std::min(hi, t.end);
        if (b < e) k.scale_to_f32(j.A[a].offset(b - lo), 1.0f, e - b, j.A_out + b);
      }
    } else {
      const std::size_t R = j.rank_sum();
      for (std::size_t o = t.begin; o < t.end; ++o)
        for (std::size_t a = 0; a < j.B.size(); ++a)
          k.scale_to_f32(j.B[a].offset(o * j.r[a]), static_cast<float>(j.cb[a]), j.r[a],
                         j.B_out + o * R + off[a]);
    }
  });
}

void run_gram(std::vector<Job>& jobs, int threads) {
  const Kernels& k = kernels();
  const int nt = resolve_threads(threads);
  // With at least as many modules as threads, one task per (module, side) sums its chunks in
  // order; with fewer, chunks run in parallel into separate partial sums that are then added
  // in the same order. Both give the same bits.
  const bool per_module = jobs.size() >= static_cast<std::size_t>(nt);
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    for (std::size_t side = 0; side < 2; ++side) {
      const std::size_t n = side == 0 ? jobs[i].in : jobs[i].out;
      const std::size_t nchunks = (n + kRowChunk - 1) / kRowChunk;
      if (per_module) tasks.push_back({i, side, 0, nchunks});
      else split(tasks, i, side, nchunks, 1);
    }
  }
  std::vector<std::vector<double>> partial(per_module ? 0 : tasks.size());
  parallel_tasks(tasks, nt, [&](const Task& t) {
    const Job& j = jobs[t.job];
    const std::size_t R = j.rank_sum(), Rp = pad8(R);
    if (per_module) {
      std::vector<double> G(Rp * Rp, 0.0);
      gram_chunks(k, j, t.side, t.begin, t.end, G.data());
      finish_gram(G.data(), Rp, R, t.side == 0 ? j.GA : j.GB);
    } else {
      std::vector<double> P(Rp * Rp, 0.0);
      gram_chunks(k, j, t.side, t.begin, t.end, P.data());
      partial[static_cast<std::size_t>(&t - tasks.data())] = std::move(P);
    }
  });
  if (per_module) return;
  // Ordered reduction: the first chunk's partial starts the sum, like the per-module path.
  std::size_t ti = 0;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    for (std::size_t side = 0; side < 2; ++side) {
      const std::size_t R = jobs[i].rank_sum(), Rp = pad8(R);
      std::vector<double> G(Rp * Rp, 0.0);
      for (; ti < tasks.size() && tasks[ti].job == i && tasks[ti].side == side; ++ti)
        for (std::size_t q = 0; q < Rp * Rp; ++q) G[q] += partial[ti][q];
      finish_gram(G.data(), Rp, R, side == 0 ? jobs[i].GA : jobs[i].GB);
    }
  }
}

void run_project(std::vector<Job>& jobs, int threads) {
  const Kernels& k = kernels();
  // Zero-padded copies of PB (Rp x mp) for the float64 GEMM.
  std::vector<std::vector<double>> pb(jobs.size());
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const Job& j = jobs[i];
    const std::size_t R = j.rank_sum(), Rp = pad8(R), mp = pad8(j.m);
    pb[i].assign(Rp * mp, 0.0);
    for (std::size_t p = 0; p < R; ++p)
      for (std::size_t c = 0; c < j.m; ++c) pb[i][p * mp + c] = j.PB[p * j.m + c];
    split(tasks, i, 0, j.in, kProjectCols);
    split(tasks, i, 1, j.out, kRowChunk);
  }
  parallel_tasks(tasks, resolve_threads(threads), [&](const Task& t) {
    const Job& j = jobs[t.job];
    const auto off = offsets(j);
    const std::size_t R = j.rank_sum(), Rp = pad8(R), mp = pad8(j.m);
    if (t.side == 0) {
      std::vector<Src> rows;
      rows.reserve(R);
      for (std::size_t a = 0; a < j.A.size(); ++a)
        for (std::size_t p = 0; p < j.r[a]; ++p) rows.push_back(j.A[a].offset(p * j.in + t.begin));
      k.rowmix(rows.data(), R, j.QA, j.m, t.end - t.begin, j.A_out + t.begin, j.in);
    } else {
      std::vector<double> X((t.end - t.begin) * Rp);
      gather_b_rows(k, j, off, Rp, t.begin, t.end, X.data());
      k.gemm_f64(X.data(), t.end - t.begin, Rp, pb[t.job].data(), j.m, mp, j.B_out + t.begin * j.m, j.m);
    }
  });
}

#include "../common/kernel_levels_impl.hpp"

}  // namespace metalora::combine
