// The shared ending of every tool's main(): parse the flags, run, and turn any failure into one
// line on stderr — "NAME: error: ..." — with exit code 2 for bad flags and 1 for everything else.
// Every tool also gets --version (version and git commit), its defaults shown in --help, and
// --log-level / --log-format for its log lines (common/log.h).
#pragma once

#include <CLI/CLI.hpp>
#include <exception>
#include <functional>
#include <iostream>

#include "common/log.h"
#include "common/status.h"
#include "common/version.h"

namespace gemma2 {

inline int RunTool(const char* name, CLI::App& app, int argc, char** argv,
                   const std::function<Status()>& run) {
  app.set_version_flag("--version", std::string(name) + " " + VersionLine());
  std::string log_level = "info", log_format = "text";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off");
  app.add_option("--log-format", log_format, "text or json (one object a line)");
  for (CLI::Option* o : app.get_options()) {
    if (o->get_default_str().empty()) o->capture_default_str();  // --help shows each default
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << name << ": error: " << e.what() << "\n";
    return 2;
  }
  Status st = log::Init(name, log_level, log_format);
  if (!st.ok()) {
    std::cerr << name << ": error: " << st.message() << "\n";
    return 2;
  }
  try {
    st = run();
  } catch (const std::exception& e) {  // e.g. out of memory: still one line, still non-zero
    st = Internal(e.what());
  }
  if (!st.ok()) {
    std::cerr << name << ": error: " << st.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace gemma2
