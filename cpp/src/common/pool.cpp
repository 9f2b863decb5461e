// The task pool of the kernel drivers (see pool.hpp).
#include "pool.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace metalora::pool {

namespace {

// Helper threads never exceed this (bindings refuse more than 1024 threads anyway, and the
// count is clamped to the CPUs first).
constexpr int kMaxWorkers = 1023;

// One parallel_for call. Shared (shared_ptr) by the caller and the helpers that joined it, so
// that a helper finishing its last (failed) claim after the caller returned still holds it.
struct Work {
  void (*call)(void*, std::size_t) = nullptr;
  void* ctx = nullptr;
  std::size_t n = 0;
  std::atomic<std::size_t> next{0};  // next task to claim
  std::atomic<std::size_t> done{0};  // tasks finished (run or skipped)
  std::atomic<int> slots{0};         // helpers that may still join
  std::atomic<bool> failed{false};
  std::mutex m;
  std::condition_variable cv;  // the caller waits on it for done == n
  bool finished = false;       // under m
  std::exception_ptr error;    // under m
};

thread_local bool tl_in_task = false;

std::atomic<long> g_calls{0}, g_tasks{0}, g_helper_tasks{0};
std::atomic<int> g_last_requested{0}, g_last_threads{0};
std::atomic<int> g_awake{0};  // helpers of this process running tasks now

// Claims and runs tasks of w until none is left; returns how many this thread ran. A helper
// counts its tasks before marking them done, so the counter is exact when the call returns.
long run_tasks(Work& w, bool helper) {
  long ran = 0;
  for (;;) {
    const std::size_t t = w.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= w.n) break;
    if (!w.failed.load(std::memory_order_relaxed)) {
      try {
        w.call(w.ctx, t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(w.m);
        if (!w.error) w.error = std::current_exception();
        w.failed.store(true, std::memory_order_relaxed);
      }
    }
    ++ran;
    if (helper) g_helper_tasks.fetch_add(1, std::memory_order_relaxed);
    if (w.done.fetch_add(1, std::memory_order_acq_rel) + 1 == w.n) {
      std::lock_guard<std::mutex> lock(w.m);
      w.finished = true;
      w.cv.notify_all();
    }
  }
  return ran;
}

class Pool {
 public:
  // Makes w available to up to `helpers` helper threads, starting threads as needed.
  void submit(const std::shared_ptr<Work>& w, int helpers) {
    std::lock_guard<std::mutex> lock(m_);
    while (static_cast<int>(workers_) < helpers) {
      std::thread(&Pool::loop, this).detach();  // the pool lives until the process ends
      ++workers_;
    }
    queue_.push_back(w);
    if (helpers >= idle_) cv_.notify_all();
    else
      for (int k = 0; k < helpers; ++k) cv_.notify_one();
  }
  // No helper joins w from now on.
  void retire(const std::shared_ptr<Work>& w) {
    std::lock_guard<std::mutex> lock(m_);
    auto it = std::find(queue_.begin(), queue_.end(), w);
    if (it != queue_.end()) queue_.erase(it);
  }
  int workers() {
    std::lock_guard<std::mutex> lock(m_);
    return static_cast<int>(workers_);
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Work>> queue_;
  std::size_t workers_ = 0;
  int idle_ = 0;

  std::shared_ptr<Work> take() {  // under m_
    for (auto it = queue_.begin(); it != queue_.end();) {
      Work& w = **it;
      if (w.next.load(std::memory_order_relaxed) >= w.n) {
        it = queue_.erase(it);
        continue;
      }
      if (w.slots.fetch_sub(1, std::memory_order_relaxed) > 0) {
        std::shared_ptr<Work> got = *it;
        if (w.slots.load(std::memory_order_relaxed) <= 0) queue_.erase(it);
        return got;
      }
      it = queue_.erase(it);
    }
    return nullptr;
  }

  void loop() {
    tl_in_task = true;  // a parallel_for inside a task runs serially
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      std::shared_ptr<Work> w = take();
      if (!w) {
        ++idle_;
        cv_.wait(lock);  // passive: woken by submit
        --idle_;
        continue;
      }
      lock.unlock();
      g_awake.fetch_add(1, std::memory_order_relaxed);
      run_tasks(*w, true);
      g_awake.fetch_sub(1, std::memory_order_relaxed);
      w.reset();
      lock.lock();
    }
  }
};

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

// The busy cap: cores left by other processes, from the instantaneous count of runnable
// threads (/proc/loadavg's "running/total" field, which counts the reading thread itself).
class BusyCheck {
 public:
  int cap(int ncpu) {
    using clock = std::chrono::steady_clock;
    std::lock_guard<std::mutex> lock(m_);
    const auto now = clock::now();
    if (valid_ && now < next_) return cap_;
    int others = 0;
    const char* path = std::getenv("METALORA_LOADAVG_PATH");
    const bool real = !(path && *path);
    if (!read_running(real ? "/proc/loadavg" : path, &others)) {
      cap_ = ncpu;  // unknown (not Linux, no /proc): no cap
      others = 0;
    } else {
      others -= 1;  // the reading thread
      if (real) others -= g_awake.load(std::memory_order_relaxed);
      others = std::max(0, others);
      cap_ = std::max(1, std::min(ncpu, ncpu - others));
    }
    // Back-off: re-read after 20 ms, doubling up to 1 s while the reading does not change.
    interval_ms_ = (valid_ && others == others_) ? std::min(1000, interval_ms_ * 2) : 20;
    others_ = others;
    valid_ = true;
    next_ = now + std::chrono::milliseconds(interval_ms_);
    return cap_;
  }
  void reset() {
    std::lock_guard<std::mutex> lock(m_);
    valid_ = false;
    interval_ms_ = 20;
  }
  int others() {
    std::lock_guard<std::mutex> lock(m_);
    return valid_ ? others_ : 0;
  }

 private:
  std::mutex m_;
  bool valid_ = false;
  int cap_ = 1, others_ = 0, interval_ms_ = 20;
  std::chrono::steady_clock::time_point next_;

  static bool read_running(const char* path, int* running) {
    std::FILE* f = std::fopen(path, "r");
    if (!f) return false;
    double a, b, c;
    int r = 0, total = 0;
    const int got = std::fscanf(f, "%lf %lf %lf %d/%d", &a, &b, &c, &r, &total);
    std::fclose(f);
    if (got != 5 || r < 0) return false;
    *running = r;
    return true;
  }
};

BusyCheck& busy() {
  static BusyCheck* b = new BusyCheck;  // never destroyed (used from helpers at exit)
  return *b;
}

// Never destroyed: detached helpers may still wait on its condition variable at exit. A child
// process after fork() gets a fresh one (the parent's helpers do not exist there; the old pool's
// mutex may even be held), installed by the atfork handler.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_pool_once;

// In the child, only the forking thread exists: the parent's helpers are gone and a mutex another
// thread held at the fork stays locked. Fresh pool; fresh busy check in place (its storage is
// never freed); the counters of running helpers restart at zero.
void on_fork_child() {
  g_pool.store(new Pool, std::memory_order_release);
  ::new (static_cast<void*>(&busy())) BusyCheck;
  g_awake.store(0, std::memory_order_relaxed);
  tl_in_task = false;
}

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool.store(new Pool, std::memory_order_release);
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, &on_fork_child);
#endif
  });
  return *g_pool.load(std::memory_order_acquire);
}

int current_cap(int ncpu) { return env_flag("METALORA_NO_BUSY_CHECK") ? ncpu : busy().cap(ncpu); }

}  // namespace

int cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

int resolve(int threads) {
  const int n = cpus();
  return threads > 0 ? std::min(threads, n) : n;
}

int plan(std::size_t n, int threads) {
  pool();  // created (and its fork handler installed) before the busy check is first used
  int nt = resolve(threads);
  if (static_cast<std::size_t>(nt) > n) nt = static_cast<int>(std::max<std::size_t>(n, 1));
  if (nt > 1) nt = std::min(nt, current_cap(cpus()));
  return std::max(1, std::min(nt, kMaxWorkers + 1));
}

void run(std::size_t n, int threads, void (*call)(void*, std::size_t), void* ctx) {
  if (n == 0) return;
  const int nt = tl_in_task ? 1 : plan(n, threads);
  if (!tl_in_task) {
    g_calls.fetch_add(1, std::memory_order_relaxed);
    g_last_requested.store(resolve(threads), std::memory_order_relaxed);
    g_last_threads.store(nt, std::memory_order_relaxed);
  }
  g_tasks.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  if (nt <= 1) {  // in order on this thread; an exception stops the rest
    for (std::size_t t = 0; t < n; ++t) call(ctx, t);
    return;
  }
  auto w = std::make_shared<Work>();
  w->call = call;
  w->ctx = ctx;
  w->n = n;
  w->slots.store(nt - 1, std::memory_order_relaxed);
  Pool& p = pool();
  p.submit(w, nt - 1);
  tl_in_task = true;
  run_tasks(*w, false);
  tl_in_task = false;
  p.retire(w);
  if (w->done.load(std::memory_order_acquire) < n) {  // tasks still running on helpers
    std::unique_lock<std::mutex> lock(w->m);
    w->cv.wait(lock, [&] { return w->finished; });
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(w->m);
    error = w->error;
  }
  if (error) std::rethrow_exception(error);
}

Stats stats() {
  Stats s;
  s.calls = g_calls.load();
  s.tasks = g_tasks.load();
  s.helper_tasks = g_helper_tasks.load();
  s.last_requested = g_last_requested.load();
  s.last_threads = g_last_threads.load();
  s.cpus = cpus();
  s.busy_check = !env_flag("METALORA_NO_BUSY_CHECK");
  s.cap = current_cap(s.cpus);
  s.others_running = s.busy_check ? busy().others() : 0;
  s.workers = pool().workers();
  return s;
}

void reset() {
  g_calls = 0;
  g_tasks = 0;
  g_helper_tasks = 0;
  g_last_requested = 0;
  g_last_threads = 0;
  busy().reset();
}

}  // namespace metalora::pool
