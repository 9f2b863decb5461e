// The extension module metalora._core: capabilities and the kernel families. Each family
// registers its functions from its own file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "../src/common/pool.hpp"
#include "args.hpp"
#include "metalora/isa.hpp"

namespace py = pybind11;

void register_combine(py::module_& m);
void register_distances(py::module_& m);

namespace {

py::list names(const std::vector<metalora::Isa>& v) {
  py::list out;
  for (auto a : v) out.append(metalora::isa_name(a));
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "metalora native core: SIMD kernels with run-time CPU dispatch.";

  m.def("capabilities", []() {
    py::dict d;
    d["compiled"] = names(metalora::compiled_isas());
    d["available"] = names(metalora::available_isas());
    d["active"] = metalora::isa_name(metalora::active_isa());
    d["default"] = metalora::isa_name(metalora::best_isa());
#if defined(_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  }, "Compiled, available, active and default instruction-set levels, and OpenMP support.");

  m.def("set_isa", [](const std::string& name) {
    metalora::Isa isa;
    if (!metalora::isa_from_name(name, &isa))
      throw py::value_error("unknown instruction-set level '" + name +
                            "': use one of serial, avx2, avx512, neon");
    metalora::set_active_isa(isa);
  }, py::arg("name"), "Make the kernels use the given level (must be available).");

  m.def("pool_stats", []() {
    const metalora::pool::Stats s = metalora::pool::stats();
    py::dict d;
    d["calls"] = s.calls;
    d["tasks"] = s.tasks;
    d["helper_tasks"] = s.helper_tasks;
    d["last_requested"] = s.last_requested;
    d["last_threads"] = s.last_threads;
    d["cap"] = s.cap;
    d["workers"] = s.workers;
    d["cpus"] = s.cpus;
    d["others_running"] = s.others_running;
    d["busy_check"] = s.busy_check;
    return d;
  }, R"doc(Counters of the kernels' task pool (for tests and diagnostics).

calls / tasks: parallel calls and tasks run since the last pool_reset(); helper_tasks: tasks run
by helper threads (not the caller); last_requested / last_threads: threads the last call asked
for and was allowed (min of the request, its tasks and the busy cap); cap: cores other processes
leave idle now (cpus when the check is off); workers: helper threads alive; cpus: CPUs this
process may use; others_running: other runnable threads at the last reading; busy_check: False
when METALORA_NO_BUSY_CHECK=1.)doc");
  m.def("pool_reset", &metalora::pool::reset,
        "Zero the pool's counters and drop its cached busy reading (read again on the next call).");
  m.def("_pool_probe", [](std::size_t n, int threads, double sleep_s, long fail_at) {
    metalora::bind::threads_arg(threads);
    std::mutex mu;
    std::set<std::thread::id> ids;
    std::vector<int> ran(n, 0);
    {
      py::gil_scoped_release nogil;
      metalora::pool::parallel_for(n, threads, [&](std::size_t t) {
        if (static_cast<long>(t) == fail_at) throw std::runtime_error("task " + std::to_string(t) + " failed");
        if (sleep_s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
        std::lock_guard<std::mutex> lock(mu);
        ids.insert(std::this_thread::get_id());
        ++ran[t];
      });
    }
    py::dict d;
    d["threads_seen"] = ids.size();
    d["ran"] = ran;
    return d;
  }, py::arg("n"), py::arg("threads"), py::arg("sleep_s") = 0.0, py::arg("fail_at") = -1,
  "Test hook: run n tasks on the pool (each sleeping sleep_s; task fail_at raises RuntimeError); "
  "returns the distinct threads that ran tasks and how often each task ran.");

  register_combine(m);
  register_distances(m);
}
