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

// The fast path of combine_modules(mode="linear"): the per-module loop and its checks in one
// call. Returns None, before anything is computed, as soon as an input is not exactly what the
// kernels read in place (not a list/tuple pair, an index out of range, not a 2-D C-contiguous
// float32 / float16 / bfloat16 / uint16 ndarray, a rank or shape mismatch, outputs above
// max_bytes): the caller then takes the general path, whose checks word every error. Otherwise
// returns ([(A_out, B_out) per module], [indices of the modules whose outputs hold NaN/Inf]).
py::object linear_modules(py::handle modules_o, std::size_t K, const std::vector<std::size_t>& used,
                          const std::vector<float>& wa, py::handle cb_o, py::handle bf16,
                          int threads, double max_bytes) {
  mb::threads_arg(threads);
  if (!py::isinstance<py::list>(modules_o) || used.empty() || wa.size() != used.size())
    return py::none();
  const auto modules = py::reinterpret_borrow<py::list>(modules_o);
  const std::size_t M = modules.size(), U = used.size();
  // cb: U numbers for every module, or one list of U numbers per module.
  std::vector<std::vector<double>> cbs;
  try {
    if (py::isinstance<py::list>(cb_o) && py::len(cb_o) == M && M > 0 &&
        py::isinstance<py::list>(py::reinterpret_borrow<py::list>(cb_o)[0])) {
      for (py::handle c : cb_o) cbs.push_back(py::cast<std::vector<double>>(c));
    } else {
      cbs.push_back(py::cast<std::vector<double>>(cb_o));
    }
  } catch (const py::cast_error&) {
    return py::none();
  }
  for (const auto& c : cbs)
    if (c.size() != U) return py::none();
  const py::dtype f32 = py::dtype::of<float>(), f16(kNpyHalf), u16 = py::dtype::of<std::uint16_t>();
  const py::dtype* bf = nullptr;
  py::dtype bf_dt;
  if (!bf16.is_none()) {
    bf_dt = py::reinterpret_borrow<py::dtype>(bf16);
    bf = &bf_dt;
  }
  auto kind = [&](const py::array& a, DType* dt) {
    const py::dtype own = a.dtype();
    if (own.is(f32) || own.equal(f32)) *dt = DType::kF32;
    else if (own.is(f16) || own.equal(f16)) *dt = DType::kF16;
    else if (own.is(u16) || own.equal(u16) || (bf && (own.is(*bf) || own.equal(*bf)))) *dt = DType::kBF16;
    else return false;
    return a.ndim() == 2 && (a.flags() & py::array::c_style);
  };
  auto seq = [](py::handle o) { return py::isinstance<py::list>(o) || py::isinstance<py::tuple>(o); };
  mb::Keep keep;
  std::vector<Job> jobs;
  jobs.reserve(M);
  double bytes = 0;
  for (std::size_t i = 0; i < M; ++i) {
    py::handle pair = modules[i];
    if (!seq(pair) || py::len(pair) != 2) return py::none();
    const py::object Ao = pair[py::int_(0)], Bo = pair[py::int_(1)];
    if (!seq(Ao) || !seq(Bo)) return py::none();
    const std::size_t nA = py::len(Ao), nB = py::len(Bo);
    if (nA != K || nB != K) return py::none();
    Job j;
    py::ssize_t r = -1, in = -1, out = -1;
    for (std::size_t u = 0; u < U; ++u) {
      if (used[u] >= nA || used[u] >= nB) return py::none();
      py::object a = Ao[py::int_(used[u])], b = Bo[py::int_(used[u])];
      if (!py::isinstance<py::array>(a) || !py::isinstance<py::array>(b)) return py::none();
      py::array A = py::reinterpret_borrow<py::array>(a), B = py::reinterpret_borrow<py::array>(b);
      DType da, db;
      if (!kind(A, &da) || !kind(B, &db)) return py::none();
      if (u == 0) {
        r = A.shape(0);
        in = A.shape(1);
        out = B.shape(0);
        if (r <= 0) return py::none();
      }
      if (A.shape(0) != r || A.shape(1) != in || B.shape(0) != out || B.shape(1) != r)
        return py::none();
      j.A.push_back(Src{A.data(), da});
      j.B.push_back(Src{B.data(), db});
      j.r.push_back(static_cast<std::size_t>(r));
      keep.push_back(std::move(A));
      keep.push_back(std::move(B));
    }
    j.in = static_cast<std::size_t>(in);
    j.out = static_cast<std::size_t>(out);
    j.wa = wa;
    j.cb = cbs.size() == 1 ? cbs[0] : cbs[i];
    bytes += 4.0 * static_cast<double>(r) * static_cast<double>(in + out);
    jobs.push_back(std::move(j));
  }
  if (bytes > max_bytes) return py::none();
  // Every output is a view into one buffer: one allocation, which numpy backs with huge pages
  // (its allocator madvises large blocks), instead of one per factor. Fresh pages for 96
  // Mistral-shaped modules (38 MB) cost ~15 ms of page faults per call as separate arrays.
  std::size_t total = 0;
  for (const Job& j : jobs) total += j.r[0] * (j.in + j.out);
  py::array_t<float> buf(static_cast<py::ssize_t>(total));
  float* base = buf.mutable_data();
  py::list results;
  std::size_t off = 0;
  for (Job& j : jobs) {
    const auto r = static_cast<py::ssize_t>(j.r[0]), in = static_cast<py::ssize_t>(j.in),
               out = static_cast<py::ssize_t>(j.out);
    j.A_out = base + off;
    j.B_out = base + off + j.r[0] * j.in;
    off += j.r[0] * (j.in + j.out);
    const auto f = static_cast<py::ssize_t>(sizeof(float));
    py::array_t<float> A_out({r, in}, {in * f, f}, j.A_out, buf);
    py::array_t<float> B_out({out, r}, {r * f, f}, j.B_out, buf);
    results.append(py::make_tuple(A_out, B_out));
  }
  std::vector<unsigned char> nonfinite;
  {
    py::gil_scoped_release nogil;
    metalora::combine::run_linear_checked(jobs, threads, &nonfinite);
  }
  py::list bad;
  for (std::size_t i = 0; i < nonfinite.size(); ++i)
    if (nonfinite[i]) bad.append(i);
  return py::make_tuple(results, bad);
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
  m.def("combine_linear_modules", &linear_modules, py::arg("modules"), py::arg("n_adapters"),
        py::arg("used"),
        py::arg("wa"), py::arg("cb"), py::arg("bfloat16") = py::none(), py::arg("threads") = 0,
        py::arg("max_bytes") = 1e300,
        R"doc(Fast path of combine_modules(mode="linear") (internal; see metalora.combine).

modules: list of (A_list, B_list) pairs of n_adapters factors each; used: indices of the adapters read; wa: their weights;
cb: their B coefficients (one list for all modules, or one list per module); bfloat16: the
ml_dtypes bfloat16 dtype (or None). Returns None when an input is not a 2-D C-contiguous
float32 / float16 / bfloat16 (or uint16 bits) ndarray of consistent shapes, or the outputs would
exceed max_bytes: the caller then takes the general path. Otherwise ([(A_out, B_out), ...],
[indices of the modules whose outputs hold NaN or Inf]).)doc");
  m.def("resolve_threads", [](int threads) {
        return metalora::combine::resolve_threads(mb::threads_arg(threads));
      }, py::arg("threads") = 0, "Number of threads a call with threads=N uses (0 = all cores).");
}
