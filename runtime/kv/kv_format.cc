#include "runtime/kv/kv_format.h"

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace quantkv {

absl::StatusOr<KvFormat> ParseKvFormat(std::string_view name) {
  if (name == "fp32") return KvFormat::kF32;
  if (name == "fp16") return KvFormat::kF16;
  return absl::InvalidArgumentError(absl::StrFormat("unknown KV format '%s' (expected one of: %s)",
                                                    std::string(name),
                                                    absl::StrJoin(KvFormatNames(), ", ")));
}

std::string_view KvFormatName(KvFormat f) { return f == KvFormat::kF32 ? "fp32" : "fp16"; }

std::vector<std::string> KvFormatNames() { return {"fp32", "fp16"}; }

kernels::KvStorage KvFormatStorage(KvFormat f) {
  return f == KvFormat::kF32 ? kernels::KvStorage::kF32 : kernels::KvStorage::kF16;
}

double KvFormatBitsPerElement(KvFormat f) { return f == KvFormat::kF32 ? 32.0 : 16.0; }

}  // namespace quantkv
