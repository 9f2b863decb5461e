// Element types the kernels read. Everything is widened to float32 (or float64) in registers.
#pragma once
#include <cstddef>
#include <cstdint>

namespace metalora {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline std::size_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }

// A contiguous 1-D run of elements of one dtype.
struct Src {
  const void* ptr;
  DType dt;
  Src offset(std::size_t i) const {
    return Src{static_cast<const char*>(ptr) + i * dtype_size(dt), dt};
  }
};

}  // namespace metalora
