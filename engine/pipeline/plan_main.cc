// moeserve-plan: a stand-alone driver for the `plan pipeline` command, wired exactly as the
// `moeserve` main binary wires it, so the command can be run and tested on its own.
#include "CLI/CLI.hpp"
#include "engine/pipeline/plan_command.h"

int main(int argc, char** argv) {
  int exit_code = 0;
  CLI::App app{"moeserve-plan: pipeline planning (same as `moeserve plan`)"};
  app.require_subcommand(1);
  auto* plan = app.add_subcommand("plan", "Plan parallel layouts");
  plan->require_subcommand(1);
  RegisterPlanPipelineCommand(*plan, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  return exit_code;
}
