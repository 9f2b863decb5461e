// Bindings of the distance driver. The Python layer (metalora/distances.py) validates the user's
// input (finite values, weights, options) and gives clear messages; this layer re-checks what
// memory safety depends on (dtype, contiguity, shapes), never copies, and releases the GIL while
// the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "metalora/distances.hpp"

namespace py = pybind11;
namespace md = metalora::distances;

namespace {

bool is_f64(const py::array& a) { return a.dtype().is(py::dtype::of<double>()); }

// X and Y: C-contiguous 2-D float32 or float64 arrays of one dtype with the same columns.
void check_pair(const py::array& X, const py::array& Y) {
  for (const py::array* a : {&X, &Y}) {
    if (a->ndim() != 2) throw py::value_error("point clouds must be 2-D arrays [n, d]");
    if (!(a->flags() & py::array::c_style))
      throw py::value_error("point clouds must be C-contiguous; pass np.ascontiguousarray(x)");
    if (!a->dtype().is(py::dtype::of<float>()) && !is_f64(*a))
      throw py::type_error("point clouds must be float32 or float64");
  }
  if (!X.dtype().is(Y.dtype())) throw py::type_error("both point clouds must have the same dtype");
  if (X.shape(1) != Y.shape(1)) throw py::value_error("point clouds have different dimensions");
}

const double* weights(const py::object& w, std::size_t n, const std::string& what) {
  if (w.is_none()) return nullptr;
  auto a = py::cast<py::array>(w);
  if (!is_f64(a) || a.ndim() != 1 || static_cast<std::size_t>(a.shape(0)) != n ||
      !(a.flags() & py::array::c_style))
    throw py::value_error(what + ": expected a contiguous float64 vector of length " +
                          std::to_string(n));
  return static_cast<const double*>(a.data());
}

void cost(const py::array& X, const py::array& Y, int kind, const py::array& out, int threads) {
  check_pair(X, Y);
  const std::size_t n = X.shape(0), m = Y.shape(0), d = X.shape(1);
  if (!out.dtype().is(X.dtype()) || out.ndim() != 2 || static_cast<std::size_t>(out.shape(0)) != n ||
      static_cast<std::size_t>(out.shape(1)) != m || !(out.flags() & py::array::c_style) ||
      !out.writeable())
    throw py::value_error("out: expected a writeable C-contiguous array of shape (n, m) and the "
                          "dtype of the points");
  void* o = const_cast<void*>(out.data());
  py::gil_scoped_release nogil;
  if (is_f64(X))
    md::cost_matrix<double>(static_cast<const double*>(X.data()), n,
                            static_cast<const double*>(Y.data()), m, d, kind,
                            static_cast<double*>(o), m, threads);
  else
    md::cost_matrix<float>(static_cast<const float*>(X.data()), n,
                           static_cast<const float*>(Y.data()), m, d, kind,
                           static_cast<float*>(o), m, threads);
}

py::array_t<double> vec(const std::vector<double>& v) {
  py::array_t<double> a(v.size());
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict sinkhorn(const py::array& X, const py::array& Y, const py::array& a, const py::array& b,
                  double eps, double scaling, double tol, int max_iter, bool debias, int cost_kind,
                  int threads, bool averaged_xy, double relax) {
  check_pair(X, Y);
  const std::size_t n = X.shape(0), m = Y.shape(0), d = X.shape(1);
  const double* pa = weights(a, n, "a");
  const double* pb = weights(b, m, "b");
  if (!pa || !pb) throw py::value_error("weights are required");
  if (!(eps > 0)) throw py::value_error("eps must be > 0");
  if (!(scaling > 0 && scaling < 1)) throw py::value_error("scaling must be in (0, 1)");
  md::SinkhornOptions opt;
  opt.eps = eps;
  opt.scaling = scaling;
  opt.tol = tol;
  opt.max_iter = max_iter;
  opt.debias = debias;
  opt.cost = cost_kind;
  opt.threads = threads;
  opt.averaged_xy = averaged_xy;
  if (!(relax >= 1.0 && relax < 2.0)) throw py::value_error("relax must be in [1, 2)");
  opt.relax = relax;
  md::SinkhornResult r;
  {
    py::gil_scoped_release nogil;
    if (is_f64(X))
      r = md::sinkhorn<double>(static_cast<const double*>(X.data()), n,
                               static_cast<const double*>(Y.data()), m, d, pa, pb, opt);
    else
      r = md::sinkhorn<float>(static_cast<const float*>(X.data()), n,
                              static_cast<const float*>(Y.data()), m, d, pa, pb, opt);
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

py::array_t<double> sliced(const py::array& X, const py::array& Y, const py::object& a,
                           const py::object& b, const py::array& P, double p, int threads) {
  check_pair(X, Y);
  check_pair(X, P);
  const std::size_t n = X.shape(0), m = Y.shape(0), d = X.shape(1), L = P.shape(0);
  const double* pa = weights(a, n, "a");
  const double* pb = weights(b, m, "b");
  py::array_t<double> out(L);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (is_f64(X))
      md::sliced<double>(static_cast<const double*>(X.data()), n,
                         static_cast<const double*>(Y.data()), m, d, pa, pb,
                         static_cast<const double*>(P.data()), L, p, threads, o);
    else
      md::sliced<float>(static_cast<const float*>(X.data()), n,
                        static_cast<const float*>(Y.data()), m, d, pa, pb,
                        static_cast<const float*>(P.data()), L, p, threads, o);
  }
  return out;
}

double w1d(const py::array& u, const py::array& v, const py::object& uw, const py::object& vw,
           double p) {
  for (const py::array* x : {&u, &v})
    if (!is_f64(*x) || x->ndim() != 1 || !(x->flags() & py::array::c_style) || x->shape(0) == 0)
      throw py::value_error("samples must be non-empty contiguous float64 vectors");
  const std::size_t n = u.shape(0), m = v.shape(0);
  const double* pu = weights(uw, n, "u_weights");
  const double* pv = weights(vw, m, "v_weights");
  py::gil_scoped_release nogil;
  return md::wasserstein_1d(static_cast<const double*>(u.data()), n, pu,
                            static_cast<const double*>(v.data()), m, pv, p);
}

py::tuple ksums(const py::array& X, const py::array& Y, int kind, const std::vector<double>& params,
                int threads) {
  check_pair(X, Y);
  const std::size_t n = X.shape(0), m = Y.shape(0), d = X.shape(1);
  if (kind < 0 || kind > 2) throw py::value_error("unknown kernel kind");
  double out[3];
  {
    py::gil_scoped_release nogil;
    if (is_f64(X))
      md::kernel_sums<double>(static_cast<const double*>(X.data()), n,
                              static_cast<const double*>(Y.data()), m, d, kind, params.data(),
                              params.size(), threads, out);
    else
      md::kernel_sums<float>(static_cast<const float*>(X.data()), n,
                             static_cast<const float*>(Y.data()), m, d, kind, params.data(),
                             params.size(), threads, out);
  }
  return py::make_tuple(out[0], out[1], out[2]);
}

}  // namespace

void register_distances(py::module_& m) {
  m.def("dist_cost", &cost, py::arg("X"), py::arg("Y"), py::arg("kind"), py::arg("out"),
        py::arg("threads") = 0,
        "Cost matrix into out (internal; see metalora.cost_matrix). kind: 0 sqeuclidean, "
        "1 cosine, 2 dot.");
  m.def("dist_sinkhorn", &sinkhorn, py::arg("X"), py::arg("Y"), py::arg("a"), py::arg("b"),
        py::arg("eps"), py::arg("scaling"), py::arg("tol"), py::arg("max_iter"),
        py::arg("debias"), py::arg("cost"), py::arg("threads") = 0, py::arg("averaged_xy") = false, py::arg("relax") = 1.0,
        "Log-domain Sinkhorn with eps-scaling (internal; see metalora.sinkhorn_divergence).");
  m.def("dist_sliced", &sliced, py::arg("X"), py::arg("Y"), py::arg("a"), py::arg("b"),
        py::arg("P"), py::arg("p"), py::arg("threads") = 0,
        "Per-projection W_p^p (internal; see metalora.sliced_wasserstein).");
  m.def("dist_w1d", &w1d, py::arg("u"), py::arg("v"), py::arg("u_weights"),
        py::arg("v_weights"), py::arg("p") = 1.0,
        "W_p^p between weighted 1-D samples (internal; see metalora.wasserstein_1d).");
  m.def("dist_kernel_sums", &ksums, py::arg("X"), py::arg("Y"), py::arg("kind"),
        py::arg("params"), py::arg("threads") = 0,
        "Sums of k(|x - y|^2) over XX, YY, XY (internal; see metalora.mmd). kind: 0 rbf "
        "(params = gammas), 1 multiscale (params = a^2), 2 sqrt.");
}
