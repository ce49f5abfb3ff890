// The options several programs share, declared once: one name, one meaning, one check, one help
// line (a program may add what it means in its own case).
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "rpc/timeouts.h"

namespace gemma2::cli {

// --model: a Hugging Face checkpoint directory.
CLI::Option* AddModel(CLI::App& app, std::string& model, const std::string& note = "");
// --tp: tensor-parallel ranks (1..1024).
CLI::Option* AddTp(CLI::App& app, int& tp, const std::string& note = "");
// --pp: pipeline stages (min_pp..1024; a program whose 0 means a default says so in `note`).
CLI::Option* AddPp(CLI::App& app, int& pp, const std::string& note = "", int min_pp = 1);
// --backend: cpu or cuda.
CLI::Option* AddBackend(CLI::App& app, std::string& backend, const std::string& note = "");
// --quantization: auto, none or fp8 (model/quantization.h).
CLI::Option* AddQuantization(CLI::App& app, std::string& quantization);
// --kv-cache-dtype: auto, fp8 or fp8_e4m3 (model/quantization.h).
CLI::Option* AddKvCacheDtype(CLI::App& app, std::string& kv_cache_dtype);
// --startup-timeout, --step-timeout, --heartbeat-timeout (seconds) into `t`; with `connect`,
// --connect-timeout too (workers).
void AddClusterTimeouts(CLI::App& app, ClusterTimeouts& t, bool connect = false);

}  // namespace gemma2::cli
