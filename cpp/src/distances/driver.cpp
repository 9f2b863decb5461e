// Driver of the distance kernels (parallel on the task pool, common/pool.hpp) (see metalora/distances.hpp).
#include "metalora/distances.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <type_traits>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "../common/pool.hpp"
#include "metalora/distance_kernels.hpp"

namespace metalora::distances {

#include "../common/threads_impl.hpp"

namespace {

// Row stride of the cost matrices the soft-min reads: whole vectors of every level, zero padded.
constexpr std::size_t kPad = 32;
// Rows per task. Multiples of every level's micro-kernel height (4, 6, 8, 12), so a task
// boundary never changes how an element is computed.
constexpr std::size_t kGramRows = 48;
constexpr std::size_t kSoftminRows = 16;
constexpr std::size_t kSumRows = 48;
// Up to this dimension squared distances are summed directly, (x - y)^2, instead of from the
// Gram matrix (no cancellation, and faster for tiny d, e.g. 1-D token ids).
constexpr std::size_t kDirectDim = 8;

std::size_t padded(std::size_t m) { return (m + kPad - 1) / kPad * kPad; }
std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

// Phases that run one after another, each one parallel_for over its tasks (serial when
// !parallel). On the pool a phase costs one wake-up of the helpers that are asleep, not a fork.
struct Phase {
  long n;
  std::function<void(long)> fn;
};

void run_phases(bool parallel, int threads, const std::vector<Phase>& phases) {
  for (const Phase& ph : phases)
    parallel_for(static_cast<std::size_t>(ph.n), parallel ? threads : 1,
                 [&](std::size_t t) { ph.fn(static_cast<long>(t)); });
}

// The float32 or float64 half of a level's table. Each public entry point takes the active
// table once (kernels()) and hands it down to every helper and task, so that one call, a whole
// Sinkhorn solve included, runs at one level even when another thread switches the level
// (set_active_isa) while it runs.
template <class T>
const KernelsT<T>& half(const Kernels& k);
template <>
const KernelsT<float>& half<float>(const Kernels& k) { return k.f32; }
template <>
const KernelsT<double>& half<double>(const Kernels& k) { return k.f64; }

// G[i, j] = max(lo, alpha <x_i, y_j> + xn_i + yn_j) for rows [0, n), parallel over row tasks.
// With upper = true (X == Y, n == m), only the column panels at or right of each row block are
// computed (every entry with j >= i, some below); mirror_lower then fills the rest.
template <class T>
void gram_parallel(const KernelsT<T>& k, const T* X, std::size_t n, const T* Y, std::size_t m,
                   std::size_t d, T alpha, const T* xn, const T* yn, T lo, T* G, std::size_t ldg,
                   int threads, bool upper = false) {
  const std::size_t nr = k.nr, npanels = ceil_div(m, nr);
  std::vector<T> Yp(npanels * nr * d + 1);
  constexpr std::size_t kPanelsPerTask = 4;
  const long npack = static_cast<long>(ceil_div(npanels, kPanelsPerTask));
  const long nrows = static_cast<long>(ceil_div(n, kGramRows));
  auto pack = [&](long t) {
    const std::size_t j0 = static_cast<std::size_t>(t) * kPanelsPerTask * nr;
    const std::size_t j1 = std::min(m, j0 + kPanelsPerTask * nr);
    k.pack(Y + j0 * d, d, j1 - j0, d, Yp.data() + j0 * d);
  };
  auto rows = [&](long t) {
    const std::size_t i0 = static_cast<std::size_t>(t) * kGramRows, i1 = std::min(n, i0 + kGramRows);
    const std::size_t j0 = upper ? i0 / nr * nr : 0;
    k.gram(X + i0 * d, d, i1 - i0, Yp.data() + j0 * d, m - j0, d, alpha,
           xn ? xn + i0 : nullptr, yn ? yn + j0 : nullptr, lo, G + i0 * ldg + j0, ldg);
  };
  run_phases(nrows > 1, threads, {{npack, pack}, {nrows, rows}});
}

// D[i, j] = D[j, i] for j < i (n x n, row stride ld), blocked.
template <class T>
void mirror_lower(T* D, std::size_t n, std::size_t ld, int threads) {
  constexpr std::size_t kb = 32;
  parallel_for(ceil_div(n, kb), threads, [&](std::size_t t) {
    const std::size_t i0 = t * kb, i1 = std::min(n, i0 + kb);
    for (std::size_t j0 = 0; j0 < i1; j0 += kb) {
      const std::size_t j1 = std::min(i1, j0 + kb);
      for (std::size_t i = i0; i < i1; ++i)
        for (std::size_t j = j0; j < std::min(j1, i); ++j) D[i * ld + j] = D[j * ld + i];
    }
  });
}

template <class T>
std::vector<T> sqnorms(const KernelsT<T>& k, const T* X, std::size_t n, std::size_t d) {
  std::vector<T> out(n + 1);
  k.sqnorm(X, d, n, d, out.data());
  return out;
}

// Copies of X and Y shifted by the mean of their union: squared distances are unchanged and the
// Gram-based formula loses less to cancellation.
template <class T>
void centered(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d,
              std::vector<T>& Xc, std::vector<T>& Yc) {
  std::vector<double> mu(d, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t k = 0; k < d; ++k) mu[k] += X[i * d + k];
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t k = 0; k < d; ++k) mu[k] += Y[i * d + k];
  for (double& v : mu) v /= static_cast<double>(n + m);
  Xc.resize(n * d + 1);
  Yc.resize(m * d + 1);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t k = 0; k < d; ++k) Xc[i * d + k] = static_cast<T>(X[i * d + k] - mu[k]);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t k = 0; k < d; ++k) Yc[i * d + k] = static_cast<T>(Y[i * d + k] - mu[k]);
}

// Squared distances of rows [i0, i1) of X against all of Y into D (ld columns).
template <class T>
void sqdist_direct(const T* X, std::size_t i0, std::size_t i1, const T* Y, std::size_t m,
                   std::size_t d, T* D, std::size_t ld) {
  if (d == 1) {  // 1-D samples (token ids): a loop the compiler vectorises
    for (std::size_t i = i0; i < i1; ++i) {
      T* row = D + (i - i0) * ld;
      const T x = X[i];
      for (std::size_t j = 0; j < m; ++j) row[j] = (x - Y[j]) * (x - Y[j]);
    }
    return;
  }
  for (std::size_t i = i0; i < i1; ++i) {
    T* row = D + (i - i0) * ld;
    const T* x = X + i * d;
    for (std::size_t j = 0; j < m; ++j) {
      T s = 0;
      const T* y = Y + j * d;
      for (std::size_t k = 0; k < d; ++k) {
        const T t = x[k] - y[k];
        s += t * t;
      }
      row[j] = s;
    }
  }
}

// Full squared-distance matrix (n x ld) of centred copies; the diagonal is exactly 0 when self.
template <class T>
void sqdist_matrix(const KernelsT<T>& k, const T* X, std::size_t n, const T* Y, std::size_t m,
                   std::size_t d, bool self, T* D, std::size_t ld, int threads) {
  if (d <= kDirectDim) {
    parallel_for(ceil_div(n, kGramRows), threads, [&](std::size_t t) {
      const std::size_t i0 = t * kGramRows, i1 = std::min(n, i0 + kGramRows);
      sqdist_direct(X, i0, i1, Y, m, d, D + i0 * ld, ld);
    });
  } else {
    const auto xn = sqnorms(k, X, n, d);
    const auto yn = self ? xn : sqnorms(k, Y, m, d);
    gram_parallel<T>(k, X, n, Y, m, d, T(-2), xn.data(), yn.data(), T(0), D, ld, threads, self);
    if (self) mirror_lower(D, n, ld, threads);
  }
  if (self)
    for (std::size_t i = 0; i < n; ++i) D[i * ld + i] = T(0);
}

template <class T>
void transpose(const T* A, std::size_t n, std::size_t m, std::size_t lda, T* B, std::size_t ldb,
               int threads) {
  constexpr std::size_t kb = 32;
  parallel_for(ceil_div(n, kb), threads, [&](std::size_t t) {
    const std::size_t i0 = t * kb, i1 = std::min(n, i0 + kb);
    for (std::size_t j0 = 0; j0 < m; j0 += kb) {
      const std::size_t j1 = std::min(m, j0 + kb);
      for (std::size_t i = i0; i < i1; ++i)
        for (std::size_t j = j0; j < j1; ++j) B[j * ldb + i] = A[i * lda + j];
    }
  });
}

// The cost matrices of a debiased Sinkhorn problem in one parallel region (squared Euclidean,
// Gram path): X and Y packed once, the GEMM row blocks of Cxy and of the upper triangles of Cxx
// and Cyy as one task list, then Cyx = Cxy^T, the mirrored lower triangles and zero diagonals.
// Same values as sqdist_matrix + transpose, with two barriers instead of five fork/joins.
template <class T>
void sinkhorn_costs(const KernelsT<T>& k, const T* Xs, std::size_t n, const T* Ys, std::size_t m,
                    std::size_t d, bool debias, T* Cxy, T* Cyx, T* Cxx, T* Cyy, std::size_t ldn,
                    std::size_t ldm, int threads) {
  const std::size_t nr = k.nr;
  constexpr std::size_t kPanelsPerTask = 4, kb = 32;
  const auto xn = sqnorms(k, Xs, n, d), yn = sqnorms(k, Ys, m, d);
  const std::size_t npx = ceil_div(n, nr), npy = ceil_div(m, nr);
  std::vector<T> Xpk(npx * nr * d + 1), Ypk(npy * nr * d + 1);
  const long ptx = static_cast<long>(ceil_div(npx, kPanelsPerTask));
  const long npack = ptx + static_cast<long>(ceil_div(npy, kPanelsPerTask));
  struct Task {
    int which;
    std::size_t i0, i1;
  };
  std::vector<Task> gram_tasks, fix_tasks;
  for (int w = 0; w < (debias ? 3 : 1); ++w) {
    const std::size_t rows = w == 2 ? m : n;
    for (std::size_t i0 = 0; i0 < rows; i0 += kGramRows)
      gram_tasks.push_back({w, i0, std::min(rows, i0 + kGramRows)});
    for (std::size_t i0 = 0; i0 < rows; i0 += kb) fix_tasks.push_back({w, i0, std::min(rows, i0 + kb)});
  }
  auto pack = [&](long t) {
    const bool isx = t < ptx;
    const std::size_t q = static_cast<std::size_t>(isx ? t : t - ptx);
    const std::size_t rows = isx ? n : m;
    const std::size_t j0 = q * kPanelsPerTask * nr, j1 = std::min(rows, j0 + kPanelsPerTask * nr);
    k.pack((isx ? Xs : Ys) + j0 * d, d, j1 - j0, d, (isx ? Xpk : Ypk).data() + j0 * d);
  };
  auto gram = [&](const Task& t) {
    const std::size_t rows = t.i1 - t.i0;
    if (t.which == 0) {
      k.gram(Xs + t.i0 * d, d, rows, Ypk.data(), m, d, T(-2), xn.data() + t.i0, yn.data(), T(0),
             Cxy + t.i0 * ldm, ldm);
    } else {
      const bool x = t.which == 1;
      const std::size_t cols = x ? n : m, ld = x ? ldn : ldm, j0 = t.i0 / nr * nr;
      const T* A = x ? Xs : Ys;
      const T* an = x ? xn.data() : yn.data();
      k.gram(A + t.i0 * d, d, rows, (x ? Xpk : Ypk).data() + j0 * d, cols - j0, d, T(-2),
             an + t.i0, an + j0, T(0), (x ? Cxx : Cyy) + t.i0 * ld + j0, ld);
    }
  };
  auto fix = [&](const Task& t) {
    if (t.which == 0) {  // columns [i0, i1) of Cyx
      for (std::size_t j0 = 0; j0 < m; j0 += kb)
        for (std::size_t i = t.i0; i < t.i1; ++i)
          for (std::size_t j = j0; j < std::min(m, j0 + kb); ++j) Cyx[j * ldn + i] = Cxy[i * ldm + j];
    } else {  // rows [i0, i1): lower part from the upper triangle, zero diagonal
      T* C = t.which == 1 ? Cxx : Cyy;
      const std::size_t ld = t.which == 1 ? ldn : ldm;
      for (std::size_t j0 = 0; j0 < t.i1; j0 += kb)
        for (std::size_t i = t.i0; i < t.i1; ++i)
          for (std::size_t j = j0; j < std::min(i, j0 + kb); ++j) C[i * ld + j] = C[j * ld + i];
      for (std::size_t i = t.i0; i < t.i1; ++i) C[i * ld + i] = T(0);
    }
  };
  const long ng = static_cast<long>(gram_tasks.size()), nf = static_cast<long>(fix_tasks.size());
  run_phases(true, threads,
             {{npack, pack},
              {ng, [&](long t) { gram(gram_tasks[static_cast<std::size_t>(t)]); }},
              {nf, [&](long t) { fix(fix_tasks[static_cast<std::size_t>(t)]); }}});
}

// Chooses between `threads` and one thread for the soft-min passes by timing the first passes
// of a solve (alternately), then keeps the faster per element. A pass takes well under a
// millisecond; when the other cores are busy (other processes, or this one under `nice`), waking
// the workers for every pass costs more than it saves. Rows are computed identically either way,
// so the choice never changes the result.
struct ThreadChooser {
  static constexpr int kSamples = 3;
  int threads, chosen;
  double t_multi = 0, t_single = 0;  // seconds per element, summed
  int n_multi = 0, n_single = 0;

  explicit ThreadChooser(int t) : threads(t), chosen(t > 1 ? 0 : 1) {}
  int next() const { return chosen ? chosen : (n_multi <= n_single ? threads : 1); }
  void record(int used, double seconds, double elems) {
    if (chosen) return;
    if (used > 1) {
      t_multi += seconds / elems;
      ++n_multi;
    } else {
      t_single += seconds / elems;
      ++n_single;
    }
    if (n_multi >= kSamples && n_single >= kSamples) chosen = t_multi < t_single ? threads : 1;
  }
};

// One log-domain half-step: out_i = -eps log sum_j exp(logw_j + (pot_j - C_ij) / eps).
template <class T>
struct Softmin {
  const KernelsT<T>& k;
  const T* C;
  std::size_t rows, cols, ld;
  std::vector<T> h;

  Softmin(const KernelsT<T>& k_, const T* C_, std::size_t rows_, std::size_t cols_, std::size_t ld_)
      : k(k_), C(C_), rows(rows_), cols(cols_), ld(ld_),
        h(ld_, -std::numeric_limits<T>::infinity()) {}

  void operator()(const std::vector<double>& pot, const std::vector<double>& logw, double eps,
                  std::vector<double>& out, ThreadChooser& chooser) {
    const int threads = chooser.next();
    const auto t0 = std::chrono::steady_clock::now();
    run(pot, logw, eps, out, threads);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    chooser.record(threads, dt, static_cast<double>(rows) * static_cast<double>(cols) + 1.0);
  }

  void run(const std::vector<double>& pot, const std::vector<double>& logw, double eps,
           std::vector<double>& out, int threads) {
    for (std::size_t j = 0; j < cols; ++j) h[j] = static_cast<T>(pot[j] / eps + logw[j]);
    const T inv = static_cast<T>(1.0 / eps);
    out.resize(rows);
    const std::size_t ntasks = ceil_div(rows, kSoftminRows);
    if (threads > 1 && ntasks > 1) {
      parallel_for(ntasks, threads, [&](std::size_t t) {
        const std::size_t r0 = t * kSoftminRows, r1 = std::min(rows, r0 + kSoftminRows);
        k.softmin(C + r0 * ld, ld, r1 - r0, cols, h.data(), inv, eps, out.data() + r0);
      });
      return;
    }
    k.softmin(C, ld, rows, cols, h.data(), inv, eps, out.data());
  }
};

double dot(const std::vector<double>& w, const std::vector<double>& x) {
  double s = 0.0;
  for (std::size_t i = 0; i < w.size(); ++i) s += w[i] * x[i];
  return s;
}

// sum_i w_i exp((cur_i - next_i) / eps): the row mass of the plan built from (cur, partner)
// when next = softmin(partner); its distance to 1 per row, summed, is the marginal error.
void row_mass(const std::vector<double>& w, const std::vector<double>& cur,
              const std::vector<double>& next, double eps, double* mass, double* err) {
  double s = 0.0, e = 0.0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    const double r = std::exp((cur[i] - next[i]) / eps);
    s += w[i] * r;
    e += w[i] * std::fabs(r - 1.0);
  }
  *mass = s;
  *err = e;
}

// Row-major rows x cols matrix with row stride ld >= cols: uninitialised, pads zeroed.
template <class T>
struct Matrix {
  std::unique_ptr<T[]> buf;
  Matrix() = default;
  Matrix(std::size_t rows, std::size_t cols, std::size_t ld) { reset(rows, cols, ld); }
  void reset(std::size_t rows, std::size_t cols, std::size_t ld) {
    buf.reset(new T[rows * ld + 1]);
    for (std::size_t i = 0; i < rows; ++i)
      for (std::size_t j = cols; j < ld; ++j) buf[i * ld + j] = T(0);
  }
  T* data() { return buf.get(); }
};

// cost_matrix with the level's table given (threads resolved).
template <class T>
void cost_into(const KernelsT<T>& kt, const T* X, std::size_t n, const T* Y, std::size_t m,
               std::size_t d, int kind, T* out, std::size_t ldo, int threads) {
  if (kind == kSqEuclidean) {
    if (d <= kDirectDim) {
      parallel_for(ceil_div(n, kGramRows), threads, [&](std::size_t t) {
        const std::size_t i0 = t * kGramRows, i1 = std::min(n, i0 + kGramRows);
        sqdist_direct(X, i0, i1, Y, m, d, out + i0 * ldo, ldo);
      });
      return;
    }
    const auto xn = sqnorms(kt, X, n, d);
    const auto yn = sqnorms(kt, Y, m, d);
    gram_parallel<T>(kt, X, n, Y, m, d, T(-2), xn.data(), yn.data(), T(0), out, ldo, threads);
  } else if (kind == kCosine) {
    // Unit-norm copies (a zero vector stays zero: its cost to everything is 1).
    std::vector<T> Xu(X, X + n * d), Yu(Y, Y + m * d);
    for (auto* buf : {&Xu, &Yu}) {
      const std::size_t rows = buf->size() / (d ? d : 1);
      const auto nrm = sqnorms(kt, buf->data(), rows, d);
      for (std::size_t i = 0; i < rows; ++i) {
        const double s = std::sqrt(static_cast<double>(nrm[i]));
        if (s > 0)
          for (std::size_t k = 0; k < d; ++k) (*buf)[i * d + k] = static_cast<T>((*buf)[i * d + k] / s);
      }
    }
    std::vector<T> ones(n + 1, T(1));
    gram_parallel<T>(kt, Xu.data(), n, Yu.data(), m, d, T(-1), ones.data(), nullptr, T(0), out,
                     ldo, threads);
  } else {
    gram_parallel<T>(kt, X, n, Y, m, d, T(1), nullptr, nullptr,
                     -std::numeric_limits<T>::infinity(), out, ldo, threads);
  }
}

}  // namespace


template <class T>
void cost_matrix(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, int kind,
                 T* out, std::size_t ldo, int threads) {
  cost_into(half<T>(kernels()), X, n, Y, m, d, kind, out, ldo, resolve_threads(threads));
}

template <class T>
SinkhornResult sinkhorn(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d,
                        const double* a, const double* b, const SinkhornOptions& opt) {
  const KernelsT<T>& k = half<T>(kernels());  // the level of the whole solve
  const int threads = resolve_threads(opt.threads);
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto seconds = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  const std::size_t ldn = padded(n), ldm = padded(m);
  // Cost matrices, zero padded to whole vectors.
  // Uninitialised storage (every entry is written), zero pads past the last column.
  Matrix<T> Cxy(n, m, ldm), Cyx(m, n, ldn), Cxx, Cyy;
  std::vector<T> Xc, Yc;
  const T* Xs = X;
  const T* Ys = Y;
  if (opt.debias) {
    Cxx.reset(n, n, ldn);
    Cyy.reset(m, m, ldm);
  }
  const bool fused = opt.cost == kSqEuclidean && d > kDirectDim;
  if (opt.cost == kSqEuclidean) {
    centered(X, n, Y, m, d, Xc, Yc);
    Xs = Xc.data();
    Ys = Yc.data();
  }
  if (fused) {
    sinkhorn_costs(k, Xs, n, Ys, m, d, opt.debias, Cxy.data(), Cyx.data(), Cxx.data(), Cyy.data(),
                   ldn, ldm, threads);
  } else if (opt.cost == kSqEuclidean) {
    sqdist_matrix(k, Xs, n, Ys, m, d, false, Cxy.data(), ldm, threads);
  } else {
    cost_into(k, X, n, Y, m, d, opt.cost, Cxy.data(), ldm, threads);
  }
  if (!fused) transpose(Cxy.data(), n, m, ldm, Cyx.data(), ldn, threads);
  if (opt.debias && !fused) {
    if (opt.cost == kSqEuclidean) {
      sqdist_matrix(k, Xs, n, Xs, n, d, true, Cxx.data(), ldn, threads);
      sqdist_matrix(k, Ys, m, Ys, m, d, true, Cyy.data(), ldm, threads);
    } else {
      cost_into(k, X, n, X, n, d, opt.cost, Cxx.data(), ldn, threads);
      cost_into(k, Y, m, Y, m, d, opt.cost, Cyy.data(), ldm, threads);
      for (std::size_t i = 0; i < n; ++i) Cxx.data()[i * ldn + i] = T(0);
      for (std::size_t i = 0; i < m; ++i) Cyy.data()[i * ldm + i] = T(0);
    }
  }

  std::vector<double> la(n), lb(m), wa(a, a + n), wb(b, b + m);
  for (std::size_t i = 0; i < n; ++i) la[i] = std::log(a[i]);
  for (std::size_t j = 0; j < m; ++j) lb[j] = std::log(b[j]);

  Softmin<T> Txy(k, Cxy.data(), n, m, ldm), Tyx(k, Cyx.data(), m, n, ldn);
  Softmin<T> Txx(k, opt.debias ? Cxx.data() : nullptr, n, n, ldn);
  Softmin<T> Tyy(k, opt.debias ? Cyy.data() : nullptr, m, m, ldm);

  // Annealing schedule: from an upper bound of the costs down to eps by the factor `scaling`.
  // Upper bound of every cost: (2 max radius)^2 around the common mean for squared Euclidean
  // (triangle inequality), 2 for the cosine cost.
  double eps0 = 2.0;
  if (opt.cost == kSqEuclidean) {
    const auto rx = sqnorms(k, Xs, n, d), ry = sqnorms(k, Ys, m, d);
    double r2 = 0.0;
    for (std::size_t i = 0; i < n; ++i) r2 = std::max(r2, static_cast<double>(rx[i]));
    for (std::size_t j = 0; j < m; ++j) r2 = std::max(r2, static_cast<double>(ry[j]));
    eps0 = 4.0 * r2;
  }
  std::vector<double> schedule;
  for (double e = eps0; e > opt.eps && schedule.size() < 10000; e *= opt.scaling) schedule.push_back(e);
  schedule.push_back(opt.eps);

  SinkhornResult res;
  res.eps0 = schedule.front();
  ThreadChooser chooser(threads);
  const auto t_cost = clock::now();
  res.seconds_cost = seconds(t_start, t_cost);
  std::vector<double> zn(n, 0.0), zm(m, 0.0);
  std::vector<double> &f = res.f, &g = res.g, &p = res.p, &q = res.q;
  std::vector<double> ft, gt, pt, qt;
  // Initialisation at the first epsilon from zero potentials, then one symmetric (Jacobi,
  // averaged) update per epsilon of the schedule: the scheme of Feydy et al. (geomloss).
  const double e0 = schedule.front();
  Txy(zm, lb, e0, f, chooser);
  Tyx(zn, la, e0, g, chooser);
  if (opt.debias) {
    Txx(zn, la, e0, p, chooser);
    Tyy(zm, lb, e0, q, chooser);
  }
  for (std::size_t s = 0; s + 1 < schedule.size(); ++s) {
    const double e = schedule[s];
    Txy(g, lb, e, ft, chooser);
    Tyx(f, la, e, gt, chooser);
    for (std::size_t i = 0; i < n; ++i) f[i] = 0.5 * (f[i] + ft[i]);
    for (std::size_t j = 0; j < m; ++j) g[j] = 0.5 * (g[j] + gt[j]);
    if (opt.debias) {
      Txx(p, la, e, pt, chooser);
      Tyy(q, lb, e, qt, chooser);
      for (std::size_t i = 0; i < n; ++i) p[i] = 0.5 * (p[i] + pt[i]);
      for (std::size_t j = 0; j < m; ++j) q[j] = 0.5 * (q[j] + qt[j]);
    }
    ++res.anneal_steps;
  }

  const auto t_anneal = clock::now();
  res.seconds_anneal = seconds(t_cost, t_anneal);
  // At the target eps: alternating updates for (f, g); averaged symmetric updates for p and q.
  // Each problem stops on its own once its L1 marginal error is below tol.
  const double eps = opt.eps;
  bool done_xy = false, done_xx = !opt.debias, done_yy = !opt.debias;
  double mass, w = opt.relax, best_err = std::numeric_limits<double>::infinity();
  for (int it = 0; it < opt.max_iter && !(done_xy && done_xx && done_yy); ++it) {
    if (!done_xy && opt.averaged_xy) {
      // Jacobi step from (f, g): both half-steps from the same state, then averaged.
      Txy(g, lb, eps, ft, chooser);
      Tyx(f, la, eps, gt, chooser);
      row_mass(wa, f, ft, eps, &mass, &res.err_xy);
      res.ot_xy = dot(wa, f) + dot(wb, gt);  // dual value of (f, T(f)): exact column marginals
      for (std::size_t i = 0; i < n; ++i) f[i] = 0.5 * (f[i] + ft[i]);
      for (std::size_t j = 0; j < m; ++j) g[j] = 0.5 * (g[j] + gt[j]);
      done_xy = res.err_xy < opt.tol;
    } else if (!done_xy) {
      // Alternating half-steps, over-relaxed by w (w = 1: plain Sinkhorn). Safeguard: when the
      // marginal error exceeds twice the best so far, w moves halfway back to 1.
      Tyx(f, la, eps, gt, chooser);
      if (w == 1.0) g.swap(gt);
      else
        for (std::size_t j = 0; j < m; ++j) g[j] += w * (gt[j] - g[j]);
      Txy(g, lb, eps, ft, chooser);
      row_mass(wa, f, ft, eps, &mass, &res.err_xy);
      res.ot_xy = dot(wa, ft) + dot(wb, g);  // (T(g), g) has exact row marginals
      if (w == 1.0) f.swap(ft);
      else
        for (std::size_t i = 0; i < n; ++i) f[i] += w * (ft[i] - f[i]);
      done_xy = res.err_xy < opt.tol;
      if (res.err_xy > 2.0 * best_err) {  // diverging: back off (plain oscillation is normal)
        w = 1.0 + 0.5 * (w - 1.0);
        best_err = res.err_xy;
      }
      best_err = std::min(best_err, res.err_xy);
    }
    if (!done_xx) {
      Txx(p, la, eps, pt, chooser);
      row_mass(wa, p, pt, eps, &mass, &res.err_xx);
      res.ot_xx = 2.0 * dot(wa, p) - eps * (mass - 1.0);
      for (std::size_t i = 0; i < n; ++i) p[i] = 0.5 * (p[i] + pt[i]);
      done_xx = res.err_xx < opt.tol;
    }
    if (!done_yy) {
      Tyy(q, lb, eps, qt, chooser);
      row_mass(wb, q, qt, eps, &mass, &res.err_yy);
      res.ot_yy = 2.0 * dot(wb, q) - eps * (mass - 1.0);
      for (std::size_t j = 0; j < m; ++j) q[j] = 0.5 * (q[j] + qt[j]);
      done_yy = res.err_yy < opt.tol;
    }
    res.iterations = it + 1;
  }
  res.converged = done_xy && done_xx && done_yy;
  res.seconds_final = seconds(t_anneal, clock::now());
  res.threads_used = chooser.next();
  res.relax_final = w;
  return res;
}

namespace {

// Order-preserving map of floats to unsigned integers (negative values flipped).
inline std::uint32_t sort_key(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline std::uint64_t sort_key(double x) {
  std::uint64_t b;
  std::memcpy(&b, &x, 8);
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

// LSD radix sort of x[0:k] (11-bit digits: 3 passes for float, 6 for double), carrying the
// original index when idx is requested. Stable, O(k), no data-dependent branches: several
// times faster than a comparison sort on the short random rows of sliced Wasserstein.
template <class T>
void radix_sort(const T* x, std::size_t k, std::vector<T>& out, std::vector<std::uint32_t>* idx) {
  using K = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr int kBits = 11, kPasses = (8 * sizeof(T) + kBits - 1) / kBits;
  constexpr std::size_t kBuckets = std::size_t(1) << kBits;
  std::vector<K> a(k), b(k);
  std::vector<std::uint32_t> ia, ib;
  for (std::size_t i = 0; i < k; ++i) a[i] = sort_key(x[i]);
  if (idx) {
    ia.resize(k);
    ib.resize(k);
    for (std::size_t i = 0; i < k; ++i) ia[i] = static_cast<std::uint32_t>(i);
  }
  std::vector<std::size_t> count(kBuckets);
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = pass * kBits;
    std::fill(count.begin(), count.end(), 0);
    for (std::size_t i = 0; i < k; ++i) ++count[(a[i] >> shift) & (kBuckets - 1)];
    if (count[(a[0] >> shift) & (kBuckets - 1)] == k) continue;  // one digit value: no-op pass
    std::size_t sum = 0;
    for (auto& c : count) {
      const std::size_t t = c;
      c = sum;
      sum += t;
    }
    for (std::size_t i = 0; i < k; ++i) {
      const std::size_t pos = count[(a[i] >> shift) & (kBuckets - 1)]++;
      b[pos] = a[i];
      if (idx) ib[pos] = ia[i];
    }
    a.swap(b);
    if (idx) ia.swap(ib);
  }
  out.resize(k);
  for (std::size_t i = 0; i < k; ++i) {
    const K key = (a[i] & (K(1) << (8 * sizeof(T) - 1))) ? (a[i] & ~(K(1) << (8 * sizeof(T) - 1)))
                                                         : ~a[i];
    std::memcpy(&out[i], &key, sizeof(T));
  }
  if (idx) idx->swap(ia);
}

// Sorted values and their normalised weights (empty ws = uniform).
template <class T>
void sorted_sample(const T* x, std::size_t k, const double* w, std::vector<T>& xs,
                   std::vector<double>& ws) {
  if (!w) {
    radix_sort(x, k, xs, nullptr);
    ws.clear();
    return;
  }
  std::vector<std::uint32_t> idx;
  radix_sort(x, k, xs, &idx);
  double tot = 0.0;
  for (std::size_t i = 0; i < k; ++i) tot += w[i];
  ws.resize(k);
  for (std::size_t i = 0; i < k; ++i) ws[i] = w[idx[i]] / tot;
}

// W_p^p = int_0^1 |F^-1(t) - G^-1(t)|^p dt over the merged quantile levels of two sorted samples.
template <class T>
double w1d_sorted(const std::vector<T>& us, const std::vector<double>& uw,
                  const std::vector<T>& vs, const std::vector<double>& vw, double p) {
  const std::size_t n = us.size(), m = vs.size();
  auto wu = [&](std::size_t i) { return uw.empty() ? 1.0 / static_cast<double>(n) : uw[i]; };
  auto wv = [&](std::size_t j) { return vw.empty() ? 1.0 / static_cast<double>(m) : vw[j]; };
  std::size_t i = 0, j = 0;
  double cu = wu(0), cv = wv(0), t0 = 0.0, total = 0.0;
  while (i < n && j < m) {
    const double t = std::min(cu, cv);
    const double diff = std::fabs(static_cast<double>(us[i]) - static_cast<double>(vs[j]));
    const double c = p == 1.0 ? diff : (p == 2.0 ? diff * diff : std::pow(diff, p));
    if (t > t0) total += (t - t0) * c;
    t0 = std::max(t0, t);
    if (cu <= cv) {
      if (++i < n) cu += wu(i);
    } else {
      if (++j < m) cv += wv(j);
    }
  }
  return total;
}

}  // namespace

double wasserstein_1d(const double* u, std::size_t n, const double* uw, const double* v,
                      std::size_t m, const double* vw, double p) {
  std::vector<double> us, vs, uws, vws;
  sorted_sample(u, n, uw, us, uws);
  sorted_sample(v, m, vw, vs, vws);
  return w1d_sorted(us, uws, vs, vws, p);
}

template <class T>
void sliced(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, const double* a,
            const double* b, const T* P, std::size_t L, double p, int threads, double* out) {
  threads = resolve_threads(threads);
  // One parallel region: pack X and Y as GEMM panels, then tasks of kDirs directions that
  // project both clouds (as rows: contiguous for the sorts), sort and merge. Fewer fork/join
  // points than a GEMM per cloud plus a loop of sorts, which matters on busy cores.
  const KernelsT<T>& k = half<T>(kernels());  // one level for the whole call
  const std::size_t nr = k.nr;
  constexpr std::size_t kPanelsPerTask = 4, kDirs = 24;
  const std::size_t npx = ceil_div(n, nr), npy = ceil_div(m, nr);
  std::vector<T> Xpk(npx * nr * d + 1), Ypk(npy * nr * d + 1);
  const long ptx = static_cast<long>(ceil_div(npx, kPanelsPerTask));
  const long npack = ptx + static_cast<long>(ceil_div(npy, kPanelsPerTask));
  const long ntasks = static_cast<long>(ceil_div(L, kDirs));
  auto pack = [&](long t) {
    const bool isx = t < ptx;
    const std::size_t q = static_cast<std::size_t>(isx ? t : t - ptx);
    const std::size_t rows = isx ? n : m;
    const std::size_t j0 = q * kPanelsPerTask * nr, j1 = std::min(rows, j0 + kPanelsPerTask * nr);
    k.pack((isx ? X : Y) + j0 * d, d, j1 - j0, d, (isx ? Xpk : Ypk).data() + j0 * d);
  };
  auto body = [&](long t) {
    const std::size_t l0 = static_cast<std::size_t>(t) * kDirs, l1 = std::min(L, l0 + kDirs);
    std::vector<T> px((l1 - l0) * n + 1), py((l1 - l0) * m + 1), us, vs;
    std::vector<double> uws, vws;
    const T ninf = -std::numeric_limits<T>::infinity();
    k.gram(P + l0 * d, d, l1 - l0, Xpk.data(), n, d, T(1), nullptr, nullptr, ninf, px.data(), n);
    k.gram(P + l0 * d, d, l1 - l0, Ypk.data(), m, d, T(1), nullptr, nullptr, ninf, py.data(), m);
    for (std::size_t l = l0; l < l1; ++l) {
      sorted_sample(px.data() + (l - l0) * n, n, a, us, uws);
      sorted_sample(py.data() + (l - l0) * m, m, b, vs, vws);
      out[l] = w1d_sorted(us, uws, vs, vws, p);
    }
  };
  run_phases(ntasks > 1, threads, {{npack, pack}, {ntasks, body}});
}

template <class T>
void kernel_sums(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, int kind,
                 const double* params, std::size_t np, int threads, double out[3]) {
  threads = resolve_threads(threads);
  std::vector<T> Xc, Yc;
  centered(X, n, Y, m, d, Xc, Yc);
  std::vector<T> prm(params, params + np);
  prm.push_back(T(0));
  const KernelsT<T>& k = half<T>(kernels());  // one level for the whole call
  const bool gram = d > kDirectDim;
  const std::vector<T> xn = gram ? sqnorms(k, Xc.data(), n, d) : std::vector<T>();
  const std::vector<T> yn = gram ? sqnorms(k, Yc.data(), m, d) : std::vector<T>();
  auto sum_block = [&](const T* A, std::size_t na, const T* an, const T* B, std::size_t nb,
                       const T* bn, bool self) {
    const KernelsT<T>& kk = k;
    std::vector<double> rows(na, 0.0);
    std::vector<T> Bp;
    if (gram) {
      const std::size_t npanels = ceil_div(nb, kk.nr);
      Bp.resize(npanels * kk.nr * d + 1);
      kk.pack(B, d, nb, d, Bp.data());
    }
    parallel_for(ceil_div(na, kSumRows), threads, [&](std::size_t t) {
      const std::size_t i0 = t * kSumRows, i1 = std::min(na, i0 + kSumRows);
      std::vector<T> D((i1 - i0) * nb + 1);
      if (gram) {
        kk.gram(A + i0 * d, d, i1 - i0, Bp.data(), nb, d, T(-2), an + i0, bn, T(0), D.data(), nb);
      } else {
        sqdist_direct(A, i0, i1, B, nb, d, D.data(), nb);
      }
      if (self)
        for (std::size_t i = i0; i < i1; ++i) D[(i - i0) * nb + i] = T(0);
      kk.ksum(D.data(), nb, i1 - i0, nb, kind, prm.data(), np, rows.data() + i0);
    });
    double s = 0.0;
    for (double r : rows) s += r;
    return s;
  };
  out[0] = sum_block(Xc.data(), n, xn.data(), Xc.data(), n, xn.data(), true);
  out[1] = sum_block(Yc.data(), m, yn.data(), Yc.data(), m, yn.data(), true);
  // The same cloud twice (one array): its cross diagonal is exactly 0 too.
  const bool same = X == Y && n == m;
  out[2] = sum_block(Xc.data(), n, xn.data(), Yc.data(), m, yn.data(), same);
}

template void cost_matrix<float>(const float*, std::size_t, const float*, std::size_t, std::size_t,
                                 int, float*, std::size_t, int);
template void cost_matrix<double>(const double*, std::size_t, const double*, std::size_t,
                                  std::size_t, int, double*, std::size_t, int);
template SinkhornResult sinkhorn<float>(const float*, std::size_t, const float*, std::size_t,
                                        std::size_t, const double*, const double*,
                                        const SinkhornOptions&);
template SinkhornResult sinkhorn<double>(const double*, std::size_t, const double*, std::size_t,
                                         std::size_t, const double*, const double*,
                                         const SinkhornOptions&);
template void sliced<float>(const float*, std::size_t, const float*, std::size_t, std::size_t,
                            const double*, const double*, const float*, std::size_t, double, int,
                            double*);
template void sliced<double>(const double*, std::size_t, const double*, std::size_t, std::size_t,
                             const double*, const double*, const double*, std::size_t, double,
                             int, double*);
template void kernel_sums<float>(const float*, std::size_t, const float*, std::size_t, std::size_t,
                                 int, const double*, std::size_t, int, double[3]);
template void kernel_sums<double>(const double*, std::size_t, const double*, std::size_t,
                                  std::size_t, int, const double*, std::size_t, int, double[3]);

#include "../common/kernel_levels_impl.hpp"

}  // namespace metalora::distances
