// NEON (Advanced SIMD) level for arm64, where it is always present: Apple silicon, Graviton,
// Snapdragon laptops. fp16 widening uses FCVTL, bf16 widening a 16-bit shift.
#include <arm_neon.h>

#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"

namespace {

#include "../simd/vec_neon.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kNeon = make_kernels<VecF32, VecF64>();
}
