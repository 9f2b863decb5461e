// The distance driver: whole-problem operations (cost matrices, the Sinkhorn solver, sliced
// Wasserstein, kernel sums) parallel on the task pool (common/pool.hpp) over row ranges whose boundaries do not depend
// on the thread count, with every reduction in a fixed order, so 1 and N threads give the same
// bits. Callers validate shapes, dtypes and values; these functions trust them.
#pragma once
#include <cstddef>
#include <vector>

namespace metalora::distances {

enum CostKind : int { kSqEuclidean = 0, kCosine = 1, kDot = 2 };

// out[i * ldo + j] = cost(x_i, y_j): ||x_i - y_j||^2 (clamped at 0), 1 - cos(x_i, y_j), or
// <x_i, y_j>. X [n x d], Y [m x d] row-major, contiguous.
template <class T>
void cost_matrix(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, int kind,
                 T* out, std::size_t ldo, int threads);

struct SinkhornOptions {
  double eps = 0.05;     // target blur: entropic regularisation strength
  double scaling = 0.5;  // ratio between consecutive epsilons of the annealing
  double tol = 1e-6;     // on the L1 marginal error of every problem solved
  int max_iter = 1000;   // bound on updates at the target eps (annealing steps not counted)
  bool debias = true;    // also solve OT(P, P) and OT(Q, Q)
  bool averaged_xy = false;  // (f, g) at the target eps: averaged Jacobi steps, else alternating
  double relax = 1.0;        // over-relaxation of the alternating steps, in [1, 2)
  int cost = kSqEuclidean;
  int threads = 0;
};

struct SinkhornResult {
  double ot_xy = 0, ot_xx = 0, ot_yy = 0;  // dual objectives (= primal at convergence)
  double err_xy = 0, err_xx = 0, err_yy = 0;
  int anneal_steps = 0, iterations = 0;  // iterations at the target eps
  bool converged = false;
  double eps0 = 0;                        // first epsilon of the annealing
  double seconds_cost = 0, seconds_anneal = 0, seconds_final = 0;  // wall time of the phases
  int threads_used = 1;  // threads of the soft-min passes after calibration
  double relax_final = 1.0;  // over-relaxation at the end (lowered by the safeguard)
  std::vector<double> f, g, p, q;         // potentials (f, g for (x, y); p on x, q on y)
};

template <class T>
SinkhornResult sinkhorn(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d,
                        const double* a, const double* b, const SinkhornOptions& opt);

// out[l] = W_p^p between the projections of (X, a) and (Y, b) on direction l of P [L x d].
// a / b may be null (uniform).
template <class T>
void sliced(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, const double* a,
            const double* b, const T* P, std::size_t L, double p, int threads, double* out);

// W_p^p between two weighted 1-D samples (unsorted; weights may be null for uniform; weights
// need not be normalised).
double wasserstein_1d(const double* u, std::size_t n, const double* uw, const double* v,
                      std::size_t m, const double* vw, double p);

// Sums of k(||x - y||^2) over all pairs: out = {sum over X x X, sum over Y x Y, sum over X x Y}
// (self pairs included, with distance exactly 0). kind as in distance_kernels.hpp.
template <class T>
void kernel_sums(const T* X, std::size_t n, const T* Y, std::size_t m, std::size_t d, int kind,
                 const double* params, std::size_t np, int threads, double out[3]);

int resolve_threads(int threads);

}  // namespace metalora::distances
