// Bindings of the combination driver. The Python layer (metalora/combine.py) validates the
// user's input and builds the module specs; this layer checks everything memory safety and the
// meaning of the call depend on (op, spec keys, types, dtypes, shapes, contiguity, writeable and
// disjoint outputs; see args.hpp), never copies, and releases the GIL while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "args.hpp"
#include "metalora/combine.hpp"

namespace py = pybind11;
namespace mb = metalora::bind;
using metalora::DType;
using metalora::Src;
using metalora::combine::Job;

namespace {

constexpr int kNpyHalf = 23;  // NPY_HALF, numpy's float16 type number

// One operation: its name, the spec keys it needs besides the common ones, its driver.
struct Op {
  const char* name;
  std::vector<const char*> keys;
  void (*run)(std::vector<Job>&, int);
};

const char* const kCommonKeys[] = {"A", "B", "in", "out", "cb"};

const std::vector<Op>& ops() {
  static const std::vector<Op> v = {
      {"linear", {"wa", "A_out", "B_out"}, &metalora::combine::run_linear},
      {"cat", {"A_out", "B_out"}, &metalora::combine::run_cat},
      {"gram", {"GA", "GB"}, &metalora::combine::run_gram},
      {"project", {"m", "QA", "PB", "A_out", "B_out"}, &metalora::combine::run_project},
  };
  return v;
}

const Op& find_op(const std::string& name) {
  std::string names;
  for (const Op& op : ops()) {
    if (name == op.name) return op;
    names += std::string(names.empty() ? "" : ", ") + op.name;
  }
  throw py::value_error("op: unknown operation '" + name + "'; use one of " + names);
}

// The spec's keys must be exactly the common ones plus the op's: a missing key is an error, and
// so is an unknown one (a misspelt output would otherwise be silently ignored).
void check_keys(const Op& op, const py::dict& spec, const std::string& where) {
  std::vector<const char*> keys(std::begin(kCommonKeys), std::end(kCommonKeys));
  keys.insert(keys.end(), op.keys.begin(), op.keys.end());
  auto fail = [&](const std::string& what) {
    std::string list;
    for (const char* k : keys) list += std::string(list.empty() ? "" : ", ") + k;
    throw py::value_error(where + ": " + what + " (op '" + op.name + "' takes " + list + ")");
  };
  for (const char* k : keys)
    if (!spec.contains(k)) fail("missing key '" + std::string(k) + "'");
  if (spec.size() == keys.size()) return;
  for (auto item : spec) {
    const bool known = py::isinstance<py::str>(item.first) &&
                       std::any_of(keys.begin(), keys.end(), [&](const char* k) {
                         return item.first.cast<std::string>() == k;
                       });
    if (!known) fail("unknown key " + std::string(py::repr(item.first)));
  }
}

// The items of a list or tuple (not any iterable: a generator would be consumed).
std::vector<py::object> items(py::handle o, const std::string& what) {
  if (!py::isinstance<py::list>(o) && !py::isinstance<py::tuple>(o))
    throw py::type_error(what + ": expected a list of arrays, got " + mb::type_name(o));
  std::vector<py::object> v;
  for (py::handle h : o) v.push_back(py::reinterpret_borrow<py::object>(h));
  return v;
}

template <class T>
std::vector<T> numbers(py::handle o, std::size_t K, const std::string& what) {
  std::vector<T> v;
  try {
    v = py::cast<std::vector<T>>(o);
  } catch (const py::cast_error&) {
    throw py::type_error(what + ": expected a list of " + std::to_string(K) + " numbers, got " +
                         mb::type_name(o));
  }
  if (v.size() != K)
    throw py::value_error(what + ": expected one value per adapter (" + std::to_string(K) +
                          "), got " + std::to_string(v.size()));
  return v;
}

DType dtype_of(const py::array& a, const std::string& what) {
  if (mb::has_dtype(a, py::dtype::of<float>())) return DType::kF32;
  if (mb::has_dtype(a, py::dtype(kNpyHalf))) return DType::kF16;
  if (mb::has_dtype(a, py::dtype::of<std::uint16_t>())) return DType::kBF16;  // raw bfloat16 bits
  throw py::type_error(what + ": dtype " + mb::dtype_str(a) +
                       " is not supported; pass float32, float16 or bfloat16 (as uint16 bits)");
}

// Everything one call holds on to while the kernels run, and checks before they do.
struct Call {
  mb::Keep keep;
  mb::Regions regions;

  void read(const py::array& a, const std::string& what) {
    regions.input(a, what);
    keep.push_back(a);
  }
  template <class T>
  const T* input(py::handle o, std::initializer_list<py::ssize_t> shape, const std::string& what) {
    py::array a = mb::typed<T>(o, shape, what);
    read(a, what);
    return static_cast<const T*>(a.data());
  }
  template <class T>
  T* output(py::handle o, std::initializer_list<py::ssize_t> shape, const std::string& what) {
    py::array a = mb::typed<T>(o, shape, what);
    mb::check_writeable(a, what);
    regions.output(a, what);
    keep.push_back(a);
    return static_cast<T*>(a.mutable_data());
  }
};

// A Job from one module's spec dict (see register_combine for the keys).
Job make_job(const Op& op, py::handle spec_obj, Call& call, std::size_t index) {
  const std::string where = "module " + std::to_string(index);
  if (!py::isinstance<py::dict>(spec_obj))
    throw py::type_error(where + ": expected a dict, got " + mb::type_name(spec_obj));
  const auto spec = py::reinterpret_borrow<py::dict>(spec_obj);
  check_keys(op, spec, where);
  const std::string opname = op.name;
  Job j;
  j.in = mb::size_arg(spec["in"], where + ": in");
  j.out = mb::size_arg(spec["out"], where + ": out");
  const auto A = items(spec["A"], where + ": A");
  const auto B = items(spec["B"], where + ": B");
  if (A.size() != B.size() || A.empty())
    throw py::value_error(where + ": A and B must be non-empty lists of the same length, got " +
                          std::to_string(A.size()) + " and " + std::to_string(B.size()));
  const auto in = static_cast<py::ssize_t>(j.in), out = static_cast<py::ssize_t>(j.out);
  for (std::size_t a = 0; a < A.size(); ++a) {
    const std::string wa = where + ": A[" + std::to_string(a) + "]";
    const std::string wb = where + ": B[" + std::to_string(a) + "]";
    py::array Aa = mb::ndarray(A[a], wa), Ba = mb::ndarray(B[a], wb);
    const DType da = dtype_of(Aa, wa), db = dtype_of(Ba, wb);
    mb::check_layout(Aa, {-1, in}, wa);
    const py::ssize_t r = Aa.shape(0);
    if (r == 0) throw py::value_error(wa + ": rank 0 (shape " + mb::shape_str(Aa) + ")");
    mb::check_layout(Ba, {out, r}, wb);
    j.A.push_back(Src{Aa.data(), da});
    j.B.push_back(Src{Ba.data(), db});
    j.r.push_back(static_cast<std::size_t>(r));
    call.read(Aa, wa);
    call.read(Ba, wb);
  }
  const std::size_t K = j.r.size();
  const auto R = static_cast<py::ssize_t>(j.rank_sum());
  j.cb = numbers<double>(spec["cb"], K, where + ": cb");
  if (opname == "linear") {
    for (std::size_t a = 1; a < K; ++a)
      if (j.r[a] != j.r[0])
        throw py::value_error(where + ": linear needs equal ranks, got " +
                              std::to_string(j.r[0]) + " (A[0]) and " + std::to_string(j.r[a]) +
                              " (A[" + std::to_string(a) + "])");
    const auto r = static_cast<py::ssize_t>(j.r[0]);
    j.wa = numbers<float>(spec["wa"], K, where + ": wa");
    j.A_out = call.output<float>(spec["A_out"], {r, in}, where + ": A_out");
    j.B_out = call.output<float>(spec["B_out"], {out, r}, where + ": B_out");
  } else if (opname == "cat") {
    j.A_out = call.output<float>(spec["A_out"], {R, in}, where + ": A_out");
    j.B_out = call.output<float>(spec["B_out"], {out, R}, where + ": B_out");
  } else if (opname == "gram") {
    j.GA = call.output<double>(spec["GA"], {R, R}, where + ": GA");
    j.GB = call.output<double>(spec["GB"], {R, R}, where + ": GB");
  } else {  // project
    j.m = mb::size_arg(spec["m"], where + ": m");
    if (j.m == 0) throw py::value_error(where + ": m must be >= 1");
    const auto m = static_cast<py::ssize_t>(j.m);
    j.QA = call.input<float>(spec["QA"], {m, R}, where + ": QA");
    j.PB = call.input<double>(spec["PB"], {R, m}, where + ": PB");
    j.A_out = call.output<float>(spec["A_out"], {m, in}, where + ": A_out");
    j.B_out = call.output<float>(spec["B_out"], {out, m}, where + ": B_out");
  }
  return j;
}

void run(const std::string& op_name, py::handle modules, int threads) {
  const Op& op = find_op(op_name);
  mb::threads_arg(threads);
  if (!py::isinstance<py::list>(modules))
    throw py::type_error("modules: expected a list of dicts, got " + mb::type_name(modules));
  Call call;  // before nogil: released after the GIL is taken back
  std::vector<Job> jobs;
  for (py::handle spec : py::reinterpret_borrow<py::list>(modules))
    jobs.push_back(make_job(op, spec, call, jobs.size()));
  call.regions.check();
  py::gil_scoped_release nogil;
  op.run(jobs, threads);
}

}  // namespace

void register_combine(py::module_& m) {
  m.def("combine_op", &run, py::arg("op"), py::arg("modules"), py::arg("threads") = 0,
        R"doc(Run one step of the combination over many modules (internal; see metalora.combine).

op is "linear", "cat", "gram" or "project"; modules is a list of dicts, each with exactly the
keys A, B (lists of C-contiguous 2-D float32 / float16 / uint16-as-bfloat16 numpy arrays, A[j]
[r_j, in], B[j] [out, r_j]), in, out, cb (coefficient of each B_j), and per op: wa, A_out,
B_out (linear); A_out, B_out (cat); GA, GB (gram); m, QA, PB, A_out, B_out (project). Outputs
are writeable C-contiguous float32 (GA, GB: float64) arrays, written in place; no output may
share memory with another array of the call. Nothing is converted or copied: anything else is
a TypeError or ValueError naming the module and key.)doc");
  m.def("resolve_threads", [](int threads) {
        return metalora::combine::resolve_threads(mb::threads_arg(threads));
      }, py::arg("threads") = 0, "Number of threads a call with threads=N uses (0 = all cores).");
}
