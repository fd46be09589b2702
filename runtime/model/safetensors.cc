#include "runtime/model/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using nlohmann::json;

// Quoted and shortened so that a hostile key cannot flood an error message.
std::string Quote(std::string_view s) {
  constexpr size_t kMax = 80;
  if (s.size() <= kMax) return absl::StrFormat("'%s'", s);
  return absl::StrFormat("'%s...'", s.substr(0, kMax));
}

struct DtypeInfo {
  std::string_view name;
  int64_t size;  // 0 for dtypes the format knows but QuantKV does not load
  kernels::GgmlType type;
};

// Every dtype the safetensors format defines, so that an unsupported one is reported as
// such rather than as garbage.
constexpr DtypeInfo kDtypes[] = {
    {"F32", 4, kernels::GgmlType::kF32},
    {"F16", 2, kernels::GgmlType::kF16},
    {"BF16", 2, kernels::GgmlType::kBF16},
    {"F64", 0, {}},
    {"I64", 0, {}},
    {"U64", 0, {}},
    {"I32", 0, {}},
    {"U32", 0, {}},
    {"I16", 0, {}},
    {"U16", 0, {}},
    {"I8", 0, {}},
    {"U8", 0, {}},
    {"BOOL", 0, {}},
    {"F8_E4M3", 0, {}},
    {"F8_E5M2", 0, {}},
    {"F8_E8M0", 0, {}},
    {"F6_E2M3", 0, {}},
    {"F6_E3M2", 0, {}},
    {"F4", 0, {}},
    {"C64", 0, {}},
};

const DtypeInfo* FindDtype(std::string_view name) {
  for (const DtypeInfo& d : kDtypes) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

// Reads a JSON number that must be a non-negative integer representable as int64 (all byte
// offsets and dimensions are, since they index a mapped file).
absl::StatusOr<int64_t> ReadIndex(const json& v, const std::string& where) {
  if (!v.is_number_unsigned()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s must be a non-negative integer, got %s", where, v.type_name()));
  }
  const uint64_t u = v.get<uint64_t>();
  if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrFormat("%s = %d is too large", where, u));
  }
  return static_cast<int64_t>(u);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map, MappedFile::Open(path));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->name_ = path;
  const std::span<const uint8_t> bytes(map->data(), map->size());
  file->map_ = std::move(map);
  QKV_RETURN_IF_ERROR(file->ParseAll(bytes));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    std::span<const uint8_t> bytes, std::string name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->name_ = std::move(name);
  QKV_RETURN_IF_ERROR(file->ParseAll(bytes));
  return file;
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(std::string(name));  // absl here predates std::string_view lookup
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::ParseAll(std::span<const uint8_t> bytes) {
  const std::string& file = name_;
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %d bytes is too short for the 8-byte header length", file, bytes.size()));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  const uint64_t available = bytes.size() - 8;
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d exceeds the %d-byte limit", file, header_len, kMaxHeaderBytes));
  }
  if (header_len > available) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header length %d runs past the end of the file (%d bytes after it)",
                        file, header_len, available));
  }
  if (header_len < 2) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header length %d cannot hold a JSON object", file, header_len));
  }
  const uint8_t* header_begin = bytes.data() + 8;
  const uint8_t* data = header_begin + header_len;
  const int64_t data_size = static_cast<int64_t>(available - header_len);

  json header;
  try {
    header = json::parse(header_begin, data);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header is not valid JSON: %s", file, e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header must be a JSON object, got %s", file, header.type_name()));
  }

  tensors_.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: field '__metadata__' must be an object, got %s", file, value.type_name()));
      }
      for (const auto& [mkey, mvalue] : value.items()) {
        if (!mvalue.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s: '__metadata__' entry %s must be a string, got %s", file,
                              Quote(mkey), mvalue.type_name()));
        }
        metadata_[mkey] = mvalue.get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrFormat("%s: tensor %s", file, Quote(key));
    if (!value.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: entry must be an object, got %s", where, value.type_name()));
    }
    SafetensorsTensor t;
    t.name = key;

    auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'dtype' is missing or not a string", where));
    }
    t.dtype = dtype_it->get<std::string>();
    const DtypeInfo* dtype = FindDtype(t.dtype);
    if (dtype == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: unknown dtype %s", where, Quote(t.dtype)));
    }
    if (dtype->size == 0) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: dtype %s is not supported (only F32, F16 and BF16 are)", where, t.dtype));
    }
    t.type = dtype->type;

    auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'shape' is missing or not an array", where));
    }
    // ggml tensors have at most 4 dims; a little headroom keeps odd but valid files loadable.
    if (shape_it->size() > 8) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'shape' has %d dims, more than 8", where, shape_it->size()));
    }
    uint64_t n_elements = 1;
    for (size_t i = 0; i < shape_it->size(); ++i) {
      QKV_ASSIGN_OR_RETURN(const int64_t dim,
                           ReadIndex((*shape_it)[i], absl::StrFormat("%s: shape[%d]", where, i)));
      t.shape.push_back(dim);
      if (__builtin_mul_overflow(n_elements, static_cast<uint64_t>(dim), &n_elements) ||
          n_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: field 'shape' has an element count that overflows", where));
      }
    }
    uint64_t n_bytes = 0;
    if (__builtin_mul_overflow(n_elements, static_cast<uint64_t>(dtype->size), &n_bytes) ||
        n_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'shape' has a byte size that overflows", where));
    }
    t.n_elements = static_cast<int64_t>(n_elements);
    t.n_bytes = static_cast<int64_t>(n_bytes);

    auto offsets_it = value.find("data_offsets");
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'data_offsets' must be an array [begin, end]", where));
    }
    QKV_ASSIGN_OR_RETURN(const int64_t begin,
                         ReadIndex((*offsets_it)[0], where + ": data_offsets[0]"));
    QKV_ASSIGN_OR_RETURN(const int64_t end,
                         ReadIndex((*offsets_it)[1], where + ": data_offsets[1]"));
    if (begin > end) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: field 'data_offsets' = [%d, %d] has begin after end", where, begin, end));
    }
    if (end > data_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'data_offsets' = [%d, %d] runs past the %d-byte data section",
                          where, begin, end, data_size));
    }
    if (end - begin != t.n_bytes) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'data_offsets' spans %d bytes but shape x %s needs %d", where,
                          end - begin, t.dtype, t.n_bytes));
    }
    t.offset = static_cast<uint64_t>(begin);
    t.data = data + begin;
    index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }

  // The byte ranges must tile the data section exactly, as the reference implementation
  // requires: an overlap would alias two tensors, a gap or tail means a corrupt writer.
  std::vector<const SafetensorsTensor*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const SafetensorsTensor& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
              if (a->offset != b->offset) return a->offset < b->offset;
              return a->n_bytes < b->n_bytes;
            });
  int64_t expected = 0;
  const SafetensorsTensor* previous = nullptr;
  for (const SafetensorsTensor* t : by_offset) {
    if (static_cast<int64_t>(t->offset) != expected) {
      if (previous != nullptr && static_cast<int64_t>(t->offset) < expected) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: tensor %s: field 'data_offsets' overlaps tensor %s", file,
                            Quote(t->name), Quote(previous->name)));
      }
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor %s: field 'data_offsets' starts at %d, leaving a gap after byte %d", file,
          Quote(t->name), t->offset, expected));
    }
    expected += t->n_bytes;
    previous = t;
  }
  if (expected != data_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: tensors cover %d bytes but the data section has %d", file, expected, data_size));
  }
  return absl::OkStatus();
}

}  // namespace quantkv
