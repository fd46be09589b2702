// Running a model past its trained window: `--rope-scaling KIND:FACTOR` replaces the RoPE
// scaling the model file declares. linear (position interpolation: positions / F), ntk
// (NTK-aware: theta * F^(d/(d-2)), positions unchanged), yarn (YaRN over the model's
// context as the original one). Each multiplies the usable context by F.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "runtime/model/model_config.h"

namespace quantkv {

// "" or "model": leave `config` as the file has it. Otherwise KIND:FACTOR with KIND in
// linear, ntk, yarn and 1 < FACTOR <= 64; applies it to config->rope and multiplies
// config->context_length by FACTOR. INVALID_ARGUMENT naming what is wrong otherwise.
absl::Status ApplyRopeScaling(std::string_view spec, ModelConfig* config);

}  // namespace quantkv
