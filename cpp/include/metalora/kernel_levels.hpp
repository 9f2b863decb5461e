// The per-level tables of one kernel family and their lookup, declared once for every family.
//
// Included by each family's header (combine_kernels.hpp, distance_kernels.hpp) INSIDE that
// family's namespace, after its struct Kernels, with "metalora/isa.hpp" already included. No
// include guard on purpose: one file may include both families, each into its own namespace.
// Defined by cpp/src/common/kernel_levels_impl.hpp (kernels_for, kernels), included by each
// family's driver.cpp, and by the family's kernels_<isa>.cpp files (the tables).

// The table of a level; nullptr when that level is not compiled in.
const Kernels* kernels_for(Isa isa);
// The table of the active level.
const Kernels& kernels();

extern const Kernels kSerial;
#if defined(METALORA_HAVE_AVX2)
extern const Kernels kAvx2;
#endif
#if defined(METALORA_HAVE_AVX512)
extern const Kernels kAvx512;
#endif
#if defined(METALORA_HAVE_NEON)
extern const Kernels kNeon;
#endif
