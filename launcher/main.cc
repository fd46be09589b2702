// The `quantkv` binary: everything but argv handling lives in quantkv_launcher.
#include <iostream>
#include <string>
#include <vector>

#include "launcher/commands.h"
#include "launcher/subcommand.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const std::vector<quantkv::launcher::Subcommand> commands =
      quantkv::launcher::BuiltinSubcommands();
  const int code = quantkv::launcher::RunCommandLine(commands, args, std::cout, std::cerr);
  std::cout.flush();
  return std::cout.fail() && code == 0 ? quantkv::launcher::kExitFailure : code;
}
