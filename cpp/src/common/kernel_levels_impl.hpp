// kernels_for / kernels of one kernel family, written once for every family.
//
// Included by each family's driver.cpp INSIDE that family's namespace (metalora::combine,
// metalora::distances), where "metalora/kernel_levels.hpp" (via the family header) has declared
// Kernels, kSerial, kAvx2, kAvx512, kNeon. No include guard on purpose; includes nothing itself.
// Kept out of line in the driver (not inline in the header) so that no copy of it can be
// compiled with a kernels_<isa>.cpp file's instruction-set flags.

const Kernels* kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kSerial: return &kSerial;
#if defined(METALORA_HAVE_AVX2)
    case Isa::kAvx2: return &kAvx2;
#endif
#if defined(METALORA_HAVE_AVX512)
    case Isa::kAvx512: return &kAvx512;
#endif
#if defined(METALORA_HAVE_NEON)
    case Isa::kNeon: return &kNeon;
#endif
    default: return nullptr;
  }
}

const Kernels& kernels() { return *kernels_for(active_isa()); }
