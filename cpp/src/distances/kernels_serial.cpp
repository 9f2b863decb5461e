// Portable scalar level: the fallback on every CPU and the oracle the SIMD levels are tested
// against. Compiled at the baseline instruction set with floating-point contraction off, so
// a * b + c is two roundings here, and exp / sqrt come from the C library.
#include <cstddef>

#include "metalora/distance_kernels.hpp"
#include "metalora/half.hpp"

namespace {

#include "../simd/vec_serial.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kSerial = make_kernels<dk::Tiled<VecF32, 4, 2>, dk::Tiled<VecF64, 4, 2>>();
}
