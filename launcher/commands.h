// The subcommands of the `quantkv` binary. Each is defined in its own launcher/cmd_*.cc and
// listed in commands.cc; an explicit list (rather than static registrars) cannot be dropped
// by the linker when the objects sit in a static library.
#pragma once

#include <vector>

#include "launcher/subcommand.h"

namespace quantkv::launcher {

// In the order `quantkv --help` lists them.
std::vector<Subcommand> BuiltinSubcommands();

Subcommand FetchModelSubcommand();     // launcher/cmd_fetch_model.cc
Subcommand GenerateSubcommand();       // launcher/cmd_generate.cc
Subcommand PerplexitySubcommand();     // launcher/cmd_perplexity.cc
Subcommand KvPresetsSubcommand();      // launcher/cmd_kv_presets.cc
Subcommand CalibrateSubcommand();      // launcher/cmd_calibrate.cc
Subcommand FitCorrectionSubcommand();  // launcher/cmd_fit_correction.cc
Subcommand SensitivitySubcommand();    // launcher/cmd_sensitivity.cc
Subcommand KvAllocateSubcommand();     // launcher/cmd_kv_allocate.cc
Subcommand MoefySubcommand();          // launcher/cmd_moefy.cc
Subcommand ServeSubcommand();          // launcher/cmd_serve.cc
Subcommand ClientSubcommand();         // launcher/cmd_client.cc

}  // namespace quantkv::launcher
