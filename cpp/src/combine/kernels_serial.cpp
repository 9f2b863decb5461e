// Portable scalar level: the fallback on every CPU and the oracle the SIMD levels are tested
// against. Compiled at the baseline instruction set with floating-point contraction off, so
// a * b + c is two roundings here.
#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"
#include "metalora/half.hpp"

namespace {

#include "../simd/vec_serial.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kSerial = make_kernels<VecF32, VecF64>();
}
