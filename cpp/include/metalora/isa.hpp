// Runtime CPU dispatch: which instruction-set levels were compiled in, which the CPU supports,
// and which one the kernels use now.
#pragma once
#include <string>
#include <vector>

namespace metalora {

// Ordered from the portable fallback upwards on each architecture. kNeon is arm64 only,
// kAvx2 / kAvx512 are x86-64 only.
enum class Isa : int { kSerial = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);

std::vector<Isa> compiled_isas();   // levels whose kernels are in this binary
std::vector<Isa> available_isas();  // compiled and supported by this CPU and OS
Isa best_isa();                     // the default: highest available level
Isa active_isa();                   // what the kernels use now
void set_active_isa(Isa isa);       // throws std::invalid_argument if not available

}  // namespace metalora
