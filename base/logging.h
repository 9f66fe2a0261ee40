// Process-wide logging for moeserve's long-running commands (serve, rank, node, frontend, the
// EPLB controller): spdlog's default logger, writing to stderr with a UTC timestamp and a level,
// as text lines or as one JSON object per line (for log collectors). Every part of the program
// logs through spdlog::info/warn/error/debug; this header only decides where and how lines go.
//
// `--log-level` and `--log-format` are options of the top-level command (accepted before or after
// the subcommand); they default to $MOESERVE_LOG_LEVEL and $MOESERVE_LOG_FORMAT, and
// ConfigureLogging exports the chosen values to those variables so that child processes (the
// ranks `moeserve node` starts) log the same way.
//
// Thread rules: ConfigureLogging runs once, in main(), before any thread starts; logging itself
// is thread-safe (spdlog's _mt sink).
#pragma once

#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace moeserve::base {

struct LogOptions {
  std::string level = "info";   // trace, debug, info, warn, error, off
  std::string format = "text";  // text or json
};

// Adds --log-level and --log-format to `app` (the top-level command).
void AddLoggingOptions(CLI::App& app, LogOptions& options);

// Installs the default logger: stderr, `options`' level and format; `component` names the
// command in JSON lines ("serve", "rank", ...). INVALID_ARGUMENT for an unknown level or format.
absl::Status ConfigureLogging(const LogOptions& options, const std::string& component);

}  // namespace moeserve::base
