#include "cuda_archs.h"

#include <cctype>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#define FUSEDBN_STRINGIFY(...) #__VA_ARGS__
#define FUSEDBN_STRING(...) FUSEDBN_STRINGIFY(__VA_ARGS__)

namespace fusedbn {
namespace {

struct Code {
  bool ptx;       // compute_XY rather than sm_XY
  int version;    // 10 * X + Y
  bool specific;  // sm_XYa
};

std::vector<Code> parse_codes(const std::string& archs) {
  std::vector<Code> codes;
  std::stringstream list(archs);
  for (std::string code; std::getline(list, code, ',');) {
    const bool ptx = code.rfind("compute_", 0) == 0;
    if (!ptx && code.rfind("sm_", 0) != 0) continue;  // not an architecture's code
    const std::string digits = code.substr(code.find('_') + 1);
    if (digits.empty() || !std::isdigit(static_cast<unsigned char>(digits.front()))) continue;
    const bool specific = !std::isdigit(static_cast<unsigned char>(digits.back()));
    codes.push_back({ptx, std::stoi(digits), specific});
  }
  return codes;
}

bool runs_on(const Code& code, int capability) {
  if (code.ptx) return code.version <= capability;
  if (code.specific) return code.version == capability;
  return code.version / 10 == capability / 10 && code.version <= capability;
}

std::string dotted(int version) { return std::to_string(version / 10) + "." + std::to_string(version % 10); }

}  // namespace

const char* built_cuda_archs() {
#ifdef FUSEDBN_CUDA_ARCHS
  return FUSEDBN_STRING(FUSEDBN_CUDA_ARCHS);
#else
  return "";
#endif
}

std::string unsupported_gpu_message(const std::string& archs, int major, int minor, const std::string& name) {
  const int capability = 10 * major + minor;
  const std::vector<Code> codes = parse_codes(archs);
  for (const Code& code : codes) {
    if (runs_on(code, capability)) return "";
  }
  // The TORCH_CUDA_ARCH_LIST of this build, with the GPU's architecture added: machine code as X.Y (X.Ya), PTX
  // as the +PTX of its X.Y entry, or alone.
  std::set<std::pair<int, bool>> machine{{capability, false}};  // (version, architecture-specific)
  std::set<int> ptx;
  for (const Code& code : codes) {
    if (code.ptx) {
      ptx.insert(code.version);
    } else {
      machine.insert({code.version, code.specific});
    }
  }
  std::string arch_list;
  const auto add = [&](const std::string& entry) { arch_list += (arch_list.empty() ? "" : ";") + entry; };
  for (const auto& [version, specific] : machine) {
    add(dotted(version) + (specific ? "a" : ptx.erase(version) ? "+PTX" : ""));
  }
  for (const int version : ptx) add(dotted(version) + "+PTX");
  std::string built = archs.empty() ? "no GPU architecture" : archs;
  return "fusedbn's CUDA kernels were built for " + built + " (TORCH_CUDA_ARCH_LIST), none of which runs on " + name +
         " (compute capability " + std::to_string(major) + "." + std::to_string(minor) + "). Rebuild fusedbn for it: " +
         "TORCH_CUDA_ARCH_LIST=\"" + arch_list + "\" pip install --no-build-isolation . (or make build)";
}

}  // namespace fusedbn
