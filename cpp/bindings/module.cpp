// The extension module metalora._core: capabilities and the kernel families. Each family
// registers its functions from its own file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

  register_combine(m);
  register_distances(m);
}
