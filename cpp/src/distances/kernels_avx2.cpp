// AVX2 + FMA level (Haswell and later, Zen and later). This file alone is compiled with the AVX2
// flags; it is only called after the CPU and OS were checked.
#include <immintrin.h>

#include <cstddef>

#include "metalora/distance_kernels.hpp"

namespace {

#include "../simd/vec_avx2.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::distances {
const Kernels kAvx2 = make_kernels<dk::Tiled<VecF32, 6, 2>, dk::Tiled<VecF64, 6, 2>>();
}
