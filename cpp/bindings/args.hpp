// Argument checks shared by the binding files (combine.cpp, distances.cpp).
//
// The rules of the binding layer:
//  * an array argument must already be a numpy.ndarray of the dtype, rank and shape the kernel
//    reads, C-contiguous, and writeable if it is an output. Nothing is converted: a list is
//    refused rather than turned into a temporary array (which would be a silent copy, and for an
//    output a buffer freed before the kernels write into it);
//  * every pointer handed to the kernels comes from an array the call holds a reference to until
//    the kernels have returned (the call's own arguments, or `Keep` for arrays found inside
//    containers such as the combine specs, which another thread could change while the GIL is
//    released);
//  * no output may share memory with another output or with an input (`Regions`);
//  * every enum and option is checked, and the errors are TypeError (wrong type or dtype) or
//    ValueError (wrong rank, shape, layout or value) naming the argument and saying what to pass.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace metalora::bind {

namespace py = pybind11;

// References to the arrays whose data the kernels use, held until the call returns. Destroyed
// with the GIL held: declare it before any py::gil_scoped_release.
using Keep = std::vector<py::object>;

// More threads than this is refused: far above the core count of any machine this runs on, and
// far below the point where starting that many threads fails and takes the process down.
constexpr int kMaxThreads = 1024;

inline std::string type_name(py::handle o) {
  return py::str(py::type::handle_of(o).attr("__qualname__")).cast<std::string>();
}

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t k = 0; k < a.ndim(); ++k) s += (k ? ", " : "") + std::to_string(a.shape(k));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// o itself as an ndarray (subclasses such as np.memmap included), never a converted copy.
inline py::array ndarray(py::handle o, const std::string& what) {
  if (!py::isinstance<py::array>(o))
    throw py::type_error(what + ": expected a numpy.ndarray, got " + type_name(o) +
                         " (the kernels read arrays in place; pass np.asarray(x, dtype=...))");
  return py::reinterpret_borrow<py::array>(o);
}

// Equal to dt, byte order included (identity first: builtin dtypes are singletons).
inline bool has_dtype(const py::array& a, const py::dtype& dt) {
  const py::dtype own = a.dtype();
  return own.is(dt) || own.equal(dt);
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Rank and shape (a negative extent matches any), then C-contiguity.
inline void check_layout(const py::array& a, std::initializer_list<py::ssize_t> shape,
                         const std::string& what) {
  const py::ssize_t nd = static_cast<py::ssize_t>(shape.size());
  if (a.ndim() != nd)
    throw py::value_error(what + ": expected a " + std::to_string(nd) + "-D array, got shape " +
                          shape_str(a));
  py::ssize_t k = 0;
  bool match = true;
  for (py::ssize_t want : shape) {
    if (want >= 0 && a.shape(k) != want) match = false;
    ++k;
  }
  if (!match) {
    std::string s;
    for (py::ssize_t want : shape)
      s += (s.empty() ? "(" : ", ") + (want >= 0 ? std::to_string(want) : std::string("any"));
    throw py::value_error(what + ": expected shape " + s + (nd == 1 ? ",)" : ")") + ", got " +
                          shape_str(a));
  }
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(what + ": array is not C-contiguous (a transposed or sliced view?); "
                          "pass np.ascontiguousarray(x)");
}

// An array of dtype T with the given shape: the object itself, checked.
template <class T>
py::array typed(py::handle o, std::initializer_list<py::ssize_t> shape, const std::string& what) {
  py::array a = ndarray(o, what);
  if (!has_dtype(a, py::dtype::of<T>()))
    throw py::type_error(what + ": dtype " + dtype_str(a) + " is not supported; pass " +
                         std::string(py::str(py::dtype::of<T>())));
  check_layout(a, shape, what);
  return a;
}

inline void check_writeable(const py::array& a, const std::string& what) {
  if (!a.writeable())
    throw py::value_error(what + ": output array is read-only; pass a writeable array");
}

// A size: a Python int or numpy integer (not bool, not float) in [0, PY_SSIZE_T_MAX], the range
// of numpy's extents, so that it compares with them exactly.
inline std::size_t size_arg(py::handle o, const std::string& what) {
  if (PyBool_Check(o.ptr()) || !PyIndex_Check(o.ptr()))
    throw py::type_error(what + ": expected an integer, got " + type_name(o));
  const py::object v = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!v) throw py::error_already_set();
  const Py_ssize_t n = PyLong_AsSsize_t(v.ptr());
  if (n < 0) {
    PyErr_Clear();  // set when out of range
    throw py::value_error(what + ": expected a size (an integer in [0, 2^63)), got " +
                          std::string(py::str(v)));
  }
  return static_cast<std::size_t>(n);
}

inline int threads_arg(int threads) {
  if (threads < 0 || threads > kMaxThreads)
    throw py::value_error("threads must be in [0, " + std::to_string(kMaxThreads) +
                          "] (0 = all cores), got " + std::to_string(threads));
  return threads;
}

// Values of an enum argument: refuses anything outside [0, names.size()), naming the choices.
inline int enum_arg(int value, std::initializer_list<const char*> names, const std::string& what) {
  if (value < 0 || value >= static_cast<int>(names.size())) {
    std::string s;
    int k = 0;
    for (const char* n : names) {
      s += (k ? ", " : "") + std::to_string(k) + " " + n;
      ++k;
    }
    throw py::value_error(what + ": unknown value " + std::to_string(value) + "; use one of " + s);
  }
  return value;
}

// The byte ranges a call reads and writes. check() refuses an output that overlaps another
// output or an input: the kernels would read what they are writing, or two threads would write
// the same bytes.
class Regions {
 public:
  void input(const py::array& a, std::string what) { add(a, std::move(what), false); }
  void output(const py::array& a, std::string what) { add(a, std::move(what), true); }

  void check() const {
    std::vector<const Span*> out;
    for (const Span& s : spans_)
      if (s.out) out.push_back(&s);
    std::sort(out.begin(), out.end(), [](const Span* x, const Span* y) { return x->b < y->b; });
    for (std::size_t k = 1; k < out.size(); ++k)
      if (out[k]->b < out[k - 1]->e) fail(*out[k - 1], *out[k]);
    // Outputs are now disjoint and sorted by start, hence by end too: the only one an input can
    // overlap first is the first output ending after the input starts.
    for (const Span& s : spans_) {
      if (s.out) continue;
      auto it = std::upper_bound(out.begin(), out.end(), s.b,
                                 [](std::uintptr_t b, const Span* o) { return b < o->e; });
      if (it != out.end() && (*it)->b < s.e) fail(**it, s);
    }
  }

 private:
  struct Span {
    std::uintptr_t b, e;  // [b, e): addresses as integers, comparable across arrays
    std::string what;
    bool out;
  };
  std::vector<Span> spans_;

  void add(const py::array& a, std::string what, bool out) {
    if (a.nbytes() == 0) return;
    const auto b = reinterpret_cast<std::uintptr_t>(a.data());
    spans_.push_back({b, b + static_cast<std::uintptr_t>(a.nbytes()), std::move(what), out});
  }
  [[noreturn]] static void fail(const Span& o, const Span& s) {
    throw py::value_error(o.what + " and " + s.what + " share memory; give every output its own "
                          "array (np.empty)");
  }
};

}  // namespace metalora::bind
