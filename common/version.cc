#include "common/version.h"

#include "gemma2_version.h"  // generated at every build (cmake/version.cmake)

namespace gemma2 {

const char* Version() { return GEMMA2_VERSION; }
const char* GitCommit() { return GEMMA2_GIT_COMMIT; }
std::string VersionLine() { return std::string(Version()) + " (commit " + GitCommit() + ")"; }

}  // namespace gemma2
