// The combination driver: whole-module operations over many modules at once, parallel on
// the task pool over (module, range) tasks. Work is cut at boundaries that do not depend on the
// thread count, and every reduction runs in a fixed order, so 1 and N threads give the same
// bits. Callers validate shapes and dtypes; these functions trust them.
#pragma once
#include <cstddef>
#include <vector>

#include "metalora/dtype.hpp"

namespace metalora::combine {

// One module's factors across the selected adapters, plus the outputs of one operation.
struct Job {
  std::vector<Src> A;          // A_j, [r_j, in] row-major
  std::vector<Src> B;          // B_j, [out, r_j] row-major
  std::vector<std::size_t> r;  // r_j
  std::size_t in = 0, out = 0;

  std::vector<float> wa;       // linear: coefficient of A_j
  std::vector<double> cb;      // coefficient of B_j (w_j * s_j)

  float* A_out = nullptr;      // linear [r, in]; cat [R, in]; project [m, in]
  float* B_out = nullptr;      // linear [out, r]; cat [out, R]; project [out, m]
  double* GA = nullptr;        // gram: A_cat A_cat^T, [R, R]
  double* GB = nullptr;        // gram: B_cat^T B_cat, [R, R]
  const float* QA = nullptr;   // project: A_out = QA [m, R] . A_cat
  const double* PB = nullptr;  // project: B_out = B_cat . PB [R, m]
  std::size_t m = 0;

  std::size_t rank_sum() const {
    std::size_t s = 0;
    for (std::size_t v : r) s += v;
    return s;
  }
};

// A_out = sum_j wa_j A_j and B_out = sum_j cb_j B_j (equal ranks).
void run_linear(std::vector<Job>& jobs, int threads);
// The same, and (*nonfinite)[i] = 1 when module i's outputs hold a NaN or an infinity.
void run_linear_checked(std::vector<Job>& jobs, int threads, std::vector<unsigned char>* nonfinite);
// A_out = [A_1; ...; A_K] and B_out = [cb_1 B_1, ..., cb_K B_K].
void run_cat(std::vector<Job>& jobs, int threads);
// GA = A_cat A_cat^T and GB = B_cat^T B_cat in float64, B_cat = [cb_j B_j].
void run_gram(std::vector<Job>& jobs, int threads);
// A_out = QA A_cat and B_out = B_cat PB.
void run_project(std::vector<Job>& jobs, int threads);

int resolve_threads(int threads);

}  // namespace metalora::combine
