// Threading helpers of the kernel families' drivers, written once for every family:
// resolve_threads, TaskErrors and parallel_for.
//
// Included by each family's driver.cpp INSIDE that family's namespace (metalora::combine,
// metalora::distances: each declares resolve_threads in its public header), before the code that
// uses them, after <omp.h> when _OPENMP is defined and after <atomic>, <cstddef>, <exception> and
// <mutex>. No include guard on purpose; includes nothing itself.

// OpenMP threads for a call: threads > 0 as given, 0 = all cores; 1 without OpenMP.
int resolve_threads(int threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// The exceptions of the tasks of one parallel region. An exception must not leave an OpenMP
// structured block: the runtime would call std::terminate and take the Python process down. So
// every task of a region runs as errors.run(task): the first exception is kept, the tasks that
// have not started yet are skipped, and errors.rethrow() raises it on the calling thread after
// the region has ended (its closing barrier orders the write before the read).
class TaskErrors {
 public:
  template <class F>
  void run(F&& task) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      task();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_;
};

enum class Schedule { kDynamic, kStatic };

// body(t) for t in [0, ntasks) over `threads` OpenMP threads, dynamically scheduled one task at a
// time or statically in contiguous blocks; in order on the calling thread when there is one
// thread or one task. Results must not depend on which thread runs a task: the drivers cut tasks
// independently of the thread count. An exception thrown by a task stops the tasks not yet
// started and is rethrown here, on one thread as on many.
template <class F>
void parallel_for(std::size_t ntasks, int threads, F&& body,
                  Schedule schedule = Schedule::kDynamic) {
  const long n = static_cast<long>(ntasks);
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
    TaskErrors errors;
    if (schedule == Schedule::kStatic) {
#pragma omp parallel for schedule(static) num_threads(threads)
      for (long i = 0; i < n; ++i) errors.run([&] { body(static_cast<std::size_t>(i)); });
    } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (long i = 0; i < n; ++i) errors.run([&] { body(static_cast<std::size_t>(i)); });
    }
    errors.rethrow();
    return;
  }
#endif
  (void)threads;
  (void)schedule;
  for (long i = 0; i < n; ++i) body(static_cast<std::size_t>(i));
}
