#include "launcher/commands.h"

namespace quantkv::launcher {

std::vector<Subcommand> BuiltinSubcommands() {
  std::vector<Subcommand> commands;
  commands.push_back(GenerateSubcommand());
  commands.push_back(PerplexitySubcommand());
  commands.push_back(KvPresetsSubcommand());
  commands.push_back(CalibrateSubcommand());
  commands.push_back(FitCorrectionSubcommand());
  commands.push_back(SensitivitySubcommand());
  commands.push_back(KvAllocateSubcommand());
  commands.push_back(MoefySubcommand());
  commands.push_back(FetchModelSubcommand());
  commands.push_back(ServeSubcommand());
  commands.push_back(ClientSubcommand());
  return commands;
}

}  // namespace quantkv::launcher
