// Threading helpers of the kernel families' drivers, written once for every family:
// resolve_threads and parallel_for, both on the task pool of pool.hpp.
//
// Included by each family's driver.cpp INSIDE that family's namespace (metalora::combine,
// metalora::distances: each declares resolve_threads in its public header), before the code that
// uses them, after "../common/pool.hpp". No include guard on purpose; includes nothing itself.

// Threads a call asks for: threads > 0 as given (at most the CPUs this process may use), 0 = all
// of them. The pool may use fewer per call: no more than its tasks, nor than the cores other
// processes leave idle (see pool.hpp).
int resolve_threads(int threads) { return ::metalora::pool::resolve(threads); }

// body(t) for t in [0, ntasks) on up to `threads` threads of the pool, each task claimed
// dynamically; in order on the calling thread when there is one thread or one task. Results must
// not depend on which thread runs a task: the drivers cut tasks independently of the thread
// count. An exception thrown by a task stops the tasks not yet started and is rethrown here, on
// one thread as on many.
template <class F>
void parallel_for(std::size_t ntasks, int threads, F&& body) {
  ::metalora::pool::parallel_for(ntasks, threads, body);
}
