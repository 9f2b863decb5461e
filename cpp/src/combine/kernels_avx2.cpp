// AVX2 + FMA + F16C level (x86-64 since Haswell / Zen 1). This file alone is compiled with
// -mavx2 -mfma -mf16c; it is only called after the CPU was checked at run time.
#include <immintrin.h>

#include <cstddef>
#include <cstring>

#include "metalora/combine_kernels.hpp"

namespace {

#include "../simd/vec_avx2.hpp"
#include "kernels_impl.hpp"

}  // namespace

namespace metalora::combine {
const Kernels kAvx2 = make_kernels<VecF32, VecF64>();
}
