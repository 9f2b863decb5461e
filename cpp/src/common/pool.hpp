// The task pool behind every kernel family's driver (combine, distances): parallel_for(n,
// threads, fn) runs fn(t) for t in [0, n) on the calling thread and up to threads - 1 helper
// threads of one process-wide pool.
//
// Why not a static OpenMP split: on a machine whose other cores are busy (another process, a
// build), a helper thread can be descheduled for a whole time slice (milliseconds) and a static
// split, or an OpenMP barrier, waits for it; a 1 ms kernel then takes 5-8 ms on 2 threads. Here
//   * tasks are claimed one at a time from an atomic counter, and the caller starts on them at
//     once: a helper that is late (or never wakes) claims nothing and nothing waits for it; the
//     call ends when every task has run (a task claimed by a descheduled helper is the only wait);
//   * helpers sleep on a condition variable between calls (passive: no spinning on busy cores);
//   * the thread count of a call is capped by the cores other processes leave idle: the number
//     of runnable threads of the system (/proc/loadavg, 4th field) less this process's running
//     ones, read at most every 20 ms, the interval doubling up to 1 s while the reading stays the
//     same. METALORA_NO_BUSY_CHECK=1 turns the cap off (tests that compare 1 and N threads);
//     METALORA_LOADAVG_PATH reads another file in /proc/loadavg's format instead (tests).
// Results must not depend on which thread runs a task: the drivers cut their tasks independently
// of the thread count. An exception thrown by a task stops the tasks not yet started and is
// rethrown on the calling thread once the claimed ones have finished. A parallel_for inside a
// task runs serially on that thread.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace metalora::pool {

// Threads a call with `threads` asks for: threads > 0 as given, 0 = every CPU this process may
// run on (its affinity mask); never more than that CPU count.
int resolve(int threads);

// CPUs this process may run on.
int cpus();

// Threads a call of n tasks asking for `threads` would use now (busy cap included).
int plan(std::size_t n, int threads);

void run(std::size_t n, int threads, void (*call)(void*, std::size_t), void* ctx);

template <class F>
void parallel_for(std::size_t n, int threads, F&& fn) {
  using Fn = std::remove_reference_t<F>;
  run(n, threads, [](void* c, std::size_t t) { (*static_cast<Fn*>(c))(t); },
      const_cast<void*>(static_cast<const void*>(&fn)));
}

struct Stats {
  long calls = 0;         // parallel_for calls with at least one task
  long tasks = 0;         // tasks run, by anyone
  long helper_tasks = 0;  // tasks run by helper threads
  int last_requested = 0; // threads asked for by the last call (resolved)
  int last_threads = 0;   // threads the last call allowed (min of request, tasks, cap)
  int cap = 0;            // the current busy cap (cpus() when the check is off)
  int workers = 0;        // helper threads alive in the pool
  int cpus = 0;
  int others_running = 0; // other runnable threads at the last reading
  bool busy_check = true; // false when METALORA_NO_BUSY_CHECK=1
};
Stats stats();

// Zeroes the counters and drops the cached busy reading (the next call reads it again).
void reset();

}  // namespace metalora::pool
