#include "bench/results.h"

#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

namespace quantkv::bench {

std::string MachineDescription() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, model = "unknown CPU";
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return model + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores";
}

std::string UtcTimestamp() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

bool WriteResults(const std::string& dir, const std::string& name, nlohmann::json object,
                  const std::string& markdown) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  object["date"] = UtcTimestamp();
  object["machine"] = MachineDescription();
  const std::string base = dir + "/" + name;
  std::ofstream json(base + ".json");
  json << object.dump(2) << "\n";
  std::ofstream md(base + ".md");
  md << "# " << name << "\n\n" << object["date"].get<std::string>() << ", "
     << object["machine"].get<std::string>() << "\n\n" << markdown;
  if (!json || !md) {
    std::cerr << "cannot write " << base << ".{json,md}\n";
    return false;
  }
  std::cout << "wrote " << base << ".json and .md\n";
  return true;
}

}  // namespace quantkv::bench
