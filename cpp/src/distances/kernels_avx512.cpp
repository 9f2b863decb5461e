// AVX-512 (F + BW + VL + DQ) level: Skylake-SP and later, Zen 4 and later. This file alone is
// compiled with the AVX-512 flags; it is only called after the CPU and OS were checked.
#include <immintrin.h>

#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

#include "../simd/vec_avx512.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kAvx512 = make_kernels<dk::Tiled<VecF32, 12, 2>, dk::Tiled<VecF64, 12, 2>>();
}
