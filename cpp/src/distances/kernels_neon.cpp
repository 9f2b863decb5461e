// NEON (Advanced SIMD) level for arm64, where it is always present: Apple silicon, Graviton,
// Snapdragon laptops. Float64 lanes (float64x2_t) are part of AArch64's Advanced SIMD.
#include <arm_neon.h>

#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

#include "../simd/vec_neon.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kNeon = make_kernels<dk::Tiled<VecF32, 8, 2>, dk::Tiled<VecF64, 8, 2>>();
}
