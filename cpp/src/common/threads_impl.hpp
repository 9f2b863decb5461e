// resolve_threads of one kernel family's driver, written once for every family.
//
// Included by each family's driver.cpp INSIDE that family's namespace (metalora::combine,
// metalora::distances: each declares resolve_threads in its public header), after <omp.h> when
// _OPENMP is defined. No include guard on purpose; includes nothing itself.

// OpenMP threads for a call: threads > 0 as given, 0 = all cores; 1 without OpenMP.
int resolve_threads(int threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}
