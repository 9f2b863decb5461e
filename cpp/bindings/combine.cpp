// Bindings of the combination driver. The Python layer (metalora/combine.py) validates the
// user's input and builds the module specs; this layer re-checks what memory safety depends
// on (dtype, contiguity, shapes), never copies, and releases the GIL while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "metalora/combine.hpp"

namespace py = pybind11;
using metalora::DType;
using metalora::Src;
using metalora::combine::Job;

namespace {

DType dtype_of(const py::array& a, const std::string& what) {
  const py::dtype dt = a.dtype();
  if (dt.is(py::dtype::of<float>())) return DType::kF32;
  if (dt.kind() == 'f' && dt.itemsize() == 2) return DType::kF16;
  if (dt.kind() == 'u' && dt.itemsize() == 2) return DType::kBF16;  // raw bfloat16 bits
  throw py::type_error(what + ": dtype " + std::string(py::str(dt)) +
                       " is not supported; pass float32, float16 or bfloat16 (as uint16 bits)");
}

void check_2d(const py::array& a, std::size_t rows, std::size_t cols, const std::string& what) {
  if (a.ndim() != 2 || static_cast<std::size_t>(a.shape(0)) != rows ||
      static_cast<std::size_t>(a.shape(1)) != cols)
    throw py::value_error(what + ": expected shape (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(what + ": array is not C-contiguous; pass np.ascontiguousarray(x)");
}

template <class T>
T* out_ptr(const py::object& o, std::size_t rows, std::size_t cols, const std::string& what) {
  auto a = py::cast<py::array>(o);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(what + ": output must be " + std::string(py::str(py::dtype::of<T>())));
  check_2d(a, rows, cols, what);
  if (!a.writeable()) throw py::value_error(what + ": output array is read-only");
  return static_cast<T*>(a.mutable_data());
}

template <class T>
const T* in_ptr(const py::object& o, std::size_t rows, std::size_t cols, const std::string& what) {
  auto a = py::cast<py::array>(o);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(what + ": must be " + std::string(py::str(py::dtype::of<T>())));
  check_2d(a, rows, cols, what);
  return static_cast<const T*>(a.data());
}

// Builds a Job from a spec dict: A, B (lists of 2-D arrays), in, out, wa, cb, and the arrays
// the operation needs. `keep` holds references so that nothing is freed while the GIL is off.
Job make_job(const std::string& op, const py::dict& spec, std::vector<py::object>& keep,
             std::size_t index) {
  const std::string where = "module " + std::to_string(index);
  Job j;
  j.in = spec["in"].cast<std::size_t>();
  j.out = spec["out"].cast<std::size_t>();
  auto A = spec["A"].cast<py::list>();
  auto B = spec["B"].cast<py::list>();
  if (A.size() != B.size() || A.size() == 0)
    throw py::value_error(where + ": A and B must be non-empty lists of the same length");
  for (std::size_t a = 0; a < A.size(); ++a) {
    auto Aa = py::cast<py::array>(A[a]);
    auto Ba = py::cast<py::array>(B[a]);
    if (Aa.ndim() != 2) throw py::value_error(where + ": A[" + std::to_string(a) + "] must be 2-D");
    const std::size_t r = static_cast<std::size_t>(Aa.shape(0));
    check_2d(Aa, r, j.in, where + ": A[" + std::to_string(a) + "]");
    check_2d(Ba, j.out, r, where + ": B[" + std::to_string(a) + "]");
    j.A.push_back(Src{Aa.data(), dtype_of(Aa, where + ": A[" + std::to_string(a) + "]")});
    j.B.push_back(Src{Ba.data(), dtype_of(Ba, where + ": B[" + std::to_string(a) + "]")});
    j.r.push_back(r);
    keep.push_back(Aa);
    keep.push_back(Ba);
  }
  const std::size_t K = j.r.size(), R = j.rank_sum();
  if (spec.contains("cb")) {
    j.cb = spec["cb"].cast<std::vector<double>>();
    if (j.cb.size() != K) throw py::value_error(where + ": cb must have one value per adapter");
  }
  if (op == "linear") {
    for (std::size_t a = 1; a < K; ++a)
      if (j.r[a] != j.r[0]) throw py::value_error(where + ": linear needs equal ranks");
    j.wa = spec["wa"].cast<std::vector<float>>();
    if (j.wa.size() != K) throw py::value_error(where + ": wa must have one value per adapter");
    j.A_out = out_ptr<float>(spec["A_out"], j.r[0], j.in, where + ": A_out");
    j.B_out = out_ptr<float>(spec["B_out"], j.out, j.r[0], where + ": B_out");
  } else if (op == "cat") {
    j.A_out = out_ptr<float>(spec["A_out"], R, j.in, where + ": A_out");
    j.B_out = out_ptr<float>(spec["B_out"], j.out, R, where + ": B_out");
  } else if (op == "gram") {
    j.GA = out_ptr<double>(spec["GA"], R, R, where + ": GA");
    j.GB = out_ptr<double>(spec["GB"], R, R, where + ": GB");
  } else if (op == "project") {
    j.m = spec["m"].cast<std::size_t>();
    j.QA = in_ptr<float>(spec["QA"], j.m, R, where + ": QA");
    j.PB = in_ptr<double>(spec["PB"], R, j.m, where + ": PB");
    j.A_out = out_ptr<float>(spec["A_out"], j.m, j.in, where + ": A_out");
    j.B_out = out_ptr<float>(spec["B_out"], j.out, j.m, where + ": B_out");
    keep.push_back(spec["QA"]);
    keep.push_back(spec["PB"]);
  } else {
    throw py::value_error("unknown operation '" + op + "'");
  }
  if (j.cb.size() != K) throw py::value_error(where + ": cb must have one value per adapter");
  return j;
}

void run(const std::string& op, const py::list& specs, int threads) {
  std::vector<py::object> keep;
  std::vector<Job> jobs;
  jobs.reserve(specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i)
    jobs.push_back(make_job(op, specs[i].cast<py::dict>(), keep, i));
  py::gil_scoped_release nogil;
  if (op == "linear") metalora::combine::run_linear(jobs, threads);
  else if (op == "cat") metalora::combine::run_cat(jobs, threads);
  else if (op == "gram") metalora::combine::run_gram(jobs, threads);
  else metalora::combine::run_project(jobs, threads);
}

}  // namespace

void register_combine(py::module_& m) {
  m.def("combine_op", &run, py::arg("op"), py::arg("modules"), py::arg("threads") = 0,
        R"doc(Run one step of the combination over many modules (internal; see metalora.combine).

op is "linear", "cat", "gram" or "project"; modules is a list of dicts with keys
A, B (lists of C-contiguous 2-D float32 / float16 / uint16-as-bfloat16 arrays), in, out,
cb (coefficient of each B_j), and per op: wa, A_out, B_out (linear); A_out, B_out (cat);
GA, GB (gram); m, QA, PB, A_out, B_out (project). Outputs are written in place.)doc");
  m.def("resolve_threads", &metalora::combine::resolve_threads, py::arg("threads") = 0,
        "Number of threads a call with threads=N uses (0 = all cores).");
}
