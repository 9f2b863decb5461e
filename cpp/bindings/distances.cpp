// Bindings of the distance driver. The Python layer (metalora/distances.py) validates the user's
// input (finite values, weights, options) and gives clear messages; this layer checks everything
// memory safety and the meaning of the call depend on (types, dtypes, shapes, contiguity,
// writeable and disjoint outputs, enums, option ranges; see args.hpp), never copies, and
// releases the GIL while the kernels run. Every array is one of the call's own arguments, which
// the call holds until it returns.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "args.hpp"
#include "metalora/distance_kernels.hpp"  // KernelKind
#include "metalora/distances.hpp"

namespace py = pybind11;
namespace mb = metalora::bind;
namespace md = metalora::distances;

namespace {

bool is_f64(const py::array& a) { return mb::has_dtype(a, py::dtype::of<double>()); }

// A non-empty C-contiguous 2-D float32 or float64 array.
py::array cloud(py::handle o, const std::string& what) {
  py::array a = mb::ndarray(o, what);
  if (!is_f64(a) && !mb::has_dtype(a, py::dtype::of<float>()))
    throw py::type_error(what + ": dtype " + mb::dtype_str(a) +
                         " is not supported; pass float32 or float64");
  mb::check_layout(a, {-1, -1}, what);
  if (a.shape(0) == 0 || a.shape(1) == 0)
    throw py::value_error(what + ": empty point cloud (shape " + mb::shape_str(a) + ")");
  return a;
}

// Two point clouds of one dtype and dimension.
struct Pair {
  py::array X, Y;
  std::size_t n, m, d;
  bool f64;
};

Pair pair(py::handle Xo, py::handle Yo) {
  Pair p{cloud(Xo, "X"), cloud(Yo, "Y"), 0, 0, 0, false};
  if (!mb::has_dtype(p.Y, p.X.dtype()))
    throw py::type_error("X and Y must have the same dtype, got " + mb::dtype_str(p.X) + " and " +
                         mb::dtype_str(p.Y));
  if (p.X.shape(1) != p.Y.shape(1))
    throw py::value_error("X and Y have different dimensions: X is " + mb::shape_str(p.X) +
                          ", Y is " + mb::shape_str(p.Y));
  p.n = p.X.shape(0);
  p.m = p.Y.shape(0);
  p.d = p.X.shape(1);
  p.f64 = is_f64(p.X);
  return p;
}

template <class T>
const T* ptr(const py::array& a) { return static_cast<const T*>(a.data()); }

// A contiguous float64 vector of length n, or nullptr for None when the weights are optional. w
// is one of the call's arguments, so the pointer stays valid until the call returns.
const double* weights(py::handle w, std::size_t n, const std::string& what, bool optional) {
  if (w.is_none()) {
    if (optional) return nullptr;
    throw py::type_error(what + ": weights are required (a float64 array of length " +
                         std::to_string(n) + ")");
  }
  return ptr<double>(mb::typed<double>(w, {static_cast<py::ssize_t>(n)}, what));
}

void check_p(double p) {
  if (!(p >= 1.0 && std::isfinite(p)))
    throw py::value_error("p must be a finite number >= 1, got " + std::to_string(p));
}

void cost(py::handle Xo, py::handle Yo, int kind, py::handle out_o, int threads) {
  const Pair p = pair(Xo, Yo);
  mb::enum_arg(kind, {"sqeuclidean", "cosine", "dot"}, "kind");
  mb::threads_arg(threads);
  py::array out = mb::ndarray(out_o, "out");
  if (!mb::has_dtype(out, p.X.dtype()))
    throw py::type_error("out: dtype " + mb::dtype_str(out) + " differs from the points' " +
                         mb::dtype_str(p.X) + "; pass np.empty((n, m), X.dtype)");
  mb::check_layout(out, {static_cast<py::ssize_t>(p.n), static_cast<py::ssize_t>(p.m)}, "out");
  mb::check_writeable(out, "out");
  mb::Regions regions;
  regions.input(p.X, "X");
  regions.input(p.Y, "Y");
  regions.output(out, "out");
  regions.check();
  void* o = out.mutable_data();
  py::gil_scoped_release nogil;
  if (p.f64)
    md::cost_matrix<double>(ptr<double>(p.X), p.n, ptr<double>(p.Y), p.m, p.d, kind,
                            static_cast<double*>(o), p.m, threads);
  else
    md::cost_matrix<float>(ptr<float>(p.X), p.n, ptr<float>(p.Y), p.m, p.d, kind,
                           static_cast<float*>(o), p.m, threads);
}

py::array_t<double> vec(const std::vector<double>& v) {
  py::array_t<double> a(v.size());
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict sinkhorn(py::handle Xo, py::handle Yo, py::handle a, py::handle b, double eps,
                  double scaling, double tol, int max_iter, bool debias, int cost_kind,
                  int threads, bool averaged_xy, double relax) {
  const Pair p = pair(Xo, Yo);
  const double* pa = weights(a, p.n, "a", false);
  const double* pb = weights(b, p.m, "b", false);
  if (!(eps > 0 && std::isfinite(eps))) throw py::value_error("eps must be a finite number > 0");
  if (!(scaling > 0 && scaling < 1)) throw py::value_error("scaling must be in (0, 1)");
  if (!(tol > 0)) throw py::value_error("tol must be > 0");
  if (max_iter < 1) throw py::value_error("max_iter must be >= 1");
  if (!(relax >= 1.0 && relax < 2.0)) throw py::value_error("relax must be in [1, 2)");
  md::SinkhornOptions opt;
  opt.eps = eps;
  opt.scaling = scaling;
  opt.tol = tol;
  opt.max_iter = max_iter;
  opt.debias = debias;
  opt.cost = mb::enum_arg(cost_kind, {"sqeuclidean", "cosine"}, "cost");
  opt.threads = mb::threads_arg(threads);
  opt.averaged_xy = averaged_xy;
  opt.relax = relax;
  md::SinkhornResult r;
  {
    py::gil_scoped_release nogil;
    if (p.f64)
      r = md::sinkhorn<double>(ptr<double>(p.X), p.n, ptr<double>(p.Y), p.m, p.d, pa, pb, opt);
    else
      r = md::sinkhorn<float>(ptr<float>(p.X), p.n, ptr<float>(p.Y), p.m, p.d, pa, pb, opt);
  }
  py::dict out;
  out["ot_xy"] = r.ot_xy;
  out["ot_xx"] = r.ot_xx;
  out["ot_yy"] = r.ot_yy;
  out["err_xy"] = r.err_xy;
  out["err_xx"] = r.err_xx;
  out["err_yy"] = r.err_yy;
  out["anneal_steps"] = r.anneal_steps;
  out["iterations"] = r.iterations;
  out["converged"] = r.converged;
  out["eps0"] = r.eps0;
  out["threads_used"] = r.threads_used;
  out["relax"] = r.relax_final;
  out["seconds"] = py::make_tuple(r.seconds_cost, r.seconds_anneal, r.seconds_final);
  out["f"] = vec(r.f);
  out["g"] = vec(r.g);
  out["p"] = vec(r.p);
  out["q"] = vec(r.q);
  return out;
}

py::array_t<double> sliced(py::handle Xo, py::handle Yo, py::handle a, py::handle b,
                           py::handle Po, double p, int threads) {
  const Pair c = pair(Xo, Yo);
  const double* pa = weights(a, c.n, "a", true);
  const double* pb = weights(b, c.m, "b", true);
  const py::array P = mb::ndarray(Po, "P");
  if (!mb::has_dtype(P, c.X.dtype()))
    throw py::type_error("P: dtype " + mb::dtype_str(P) + " differs from the points' " +
                         mb::dtype_str(c.X));
  mb::check_layout(P, {-1, static_cast<py::ssize_t>(c.d)}, "P");
  check_p(p);
  mb::threads_arg(threads);
  const std::size_t L = P.shape(0);
  py::array_t<double> out(L);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (c.f64)
      md::sliced<double>(ptr<double>(c.X), c.n, ptr<double>(c.Y), c.m, c.d, pa, pb,
                         ptr<double>(P), L, p, threads, o);
    else
      md::sliced<float>(ptr<float>(c.X), c.n, ptr<float>(c.Y), c.m, c.d, pa, pb, ptr<float>(P),
                        L, p, threads, o);
  }
  return out;
}

double w1d(py::handle uo, py::handle vo, py::handle uw, py::handle vw, double p) {
  const py::array u = mb::typed<double>(uo, {-1}, "u"), v = mb::typed<double>(vo, {-1}, "v");
  if (u.shape(0) == 0 || v.shape(0) == 0) throw py::value_error("u and v must be non-empty");
  const std::size_t n = u.shape(0), m = v.shape(0);
  const double* pu = weights(uw, n, "u_weights", true);
  const double* pv = weights(vw, m, "v_weights", true);
  check_p(p);
  py::gil_scoped_release nogil;
  return md::wasserstein_1d(ptr<double>(u), n, pu, ptr<double>(v), m, pv, p);
}

py::tuple ksums(py::handle Xo, py::handle Yo, int kind, const std::vector<double>& params,
                int threads) {
  const Pair c = pair(Xo, Yo);
  mb::enum_arg(kind, {"rbf", "multiscale", "sqrt"}, "kind");
  if (kind == md::kSqrt ? !params.empty() : params.empty())
    throw py::value_error(kind == md::kSqrt ? "params: the sqrt kernel takes none; pass []"
                                            : "params: the rbf and multiscale kernels need at "
                                              "least one (gammas, or a^2)");
  mb::threads_arg(threads);
  double out[3];
  {
    py::gil_scoped_release nogil;
    if (c.f64)
      md::kernel_sums<double>(ptr<double>(c.X), c.n, ptr<double>(c.Y), c.m, c.d, kind,
                              params.data(), params.size(), threads, out);
    else
      md::kernel_sums<float>(ptr<float>(c.X), c.n, ptr<float>(c.Y), c.m, c.d, kind,
                             params.data(), params.size(), threads, out);
  }
  return py::make_tuple(out[0], out[1], out[2]);
}

}  // namespace

void register_distances(py::module_& m) {
  m.def("dist_cost", &cost, py::arg("X"), py::arg("Y"), py::arg("kind"), py::arg("out"),
        py::arg("threads") = 0,
        "Cost matrix into out (internal; see metalora.cost_matrix). kind: 0 sqeuclidean, "
        "1 cosine, 2 dot. X [n, d], Y [m, d]: C-contiguous float32 or float64 arrays of one "
        "dtype; out: a writeable C-contiguous [n, m] array of that dtype.");
  m.def("dist_sinkhorn", &sinkhorn, py::arg("X"), py::arg("Y"), py::arg("a"), py::arg("b"),
        py::arg("eps"), py::arg("scaling"), py::arg("tol"), py::arg("max_iter"),
        py::arg("debias"), py::arg("cost"), py::arg("threads") = 0, py::arg("averaged_xy") = false,
        py::arg("relax") = 1.0,
        "Log-domain Sinkhorn with eps-scaling (internal; see metalora.sinkhorn_divergence). "
        "a, b: float64 weights; cost: 0 sqeuclidean, 1 cosine.");
  m.def("dist_sliced", &sliced, py::arg("X"), py::arg("Y"), py::arg("a"), py::arg("b"),
        py::arg("P"), py::arg("p"), py::arg("threads") = 0,
        "Per-projection W_p^p (internal; see metalora.sliced_wasserstein). a, b: float64 "
        "weights or None (uniform); P [L, d]: directions, the dtype of the points.");
  m.def("dist_w1d", &w1d, py::arg("u"), py::arg("v"), py::arg("u_weights"),
        py::arg("v_weights"), py::arg("p") = 1.0,
        "W_p^p between weighted 1-D float64 samples (internal; see metalora.wasserstein_1d).");
  m.def("dist_kernel_sums", &ksums, py::arg("X"), py::arg("Y"), py::arg("kind"),
        py::arg("params"), py::arg("threads") = 0,
        "Sums of k(|x - y|^2) over XX, YY, XY (internal; see metalora.mmd). kind: 0 rbf "
        "(params = gammas), 1 multiscale (params = a^2), 2 sqrt (no params).");
}
