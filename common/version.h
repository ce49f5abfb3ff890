// What this build is: the project's version and the git commit it was built from.
#pragma once

#include <string>

namespace gemma2 {

const char* Version();    // e.g. "0.13.0"
const char* GitCommit();  // 12 hex digits, "-dirty" when built from changed files; "unknown"
// "0.13.0 (commit 0123456789ab)": what --version, /version and the ready line say.
std::string VersionLine();

}  // namespace gemma2
