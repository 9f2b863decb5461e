// Threading helpers of the kernel families' drivers, written once for every family:
// resolve_threads and parallel_for.
//
// Included by each family's driver.cpp INSIDE that family's namespace (metalora::combine,
// metalora::distances: each declares resolve_threads in its public header), before the code that
// uses them, after <omp.h> when _OPENMP is defined and after <cstddef>. No include guard on
// purpose; includes nothing itself.

// OpenMP threads for a call: threads > 0 as given, 0 = all cores; 1 without OpenMP.
int resolve_threads(int threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// body(t) for t in [0, ntasks), dynamically scheduled over `threads` OpenMP threads (in order on
// the calling thread when there is one thread or one task). Results must not depend on which
// thread runs a task: the drivers cut tasks independently of the thread count.
template <class F>
void parallel_for(std::size_t ntasks, int threads, F&& body) {
  const long n = static_cast<long>(ntasks);
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long i = 0; i < n; ++i) body(static_cast<std::size_t>(i));
    return;
  }
#endif
  (void)threads;
  for (long i = 0; i < n; ++i) body(static_cast<std::size_t>(i));
}
