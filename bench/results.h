// Writing bench/results/<name>.json and .md with the date and the machine they ran on.
#pragma once

#include <string>

#include "nlohmann/json.hpp"

namespace quantkv::bench {

// CPU model and core count, from /proc/cpuinfo.
std::string MachineDescription();
std::string UtcTimestamp();

// Writes `dir`/`name`.json (the object, plus date and machine) and `dir`/`name`.md
// (`markdown`, headed by the same); returns false and prints why on failure.
bool WriteResults(const std::string& dir, const std::string& name, nlohmann::json object,
                  const std::string& markdown);

}  // namespace quantkv::bench
