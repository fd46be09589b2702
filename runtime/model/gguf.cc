#include "runtime/model/gguf.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
// Bounds that keep a hostile header from making us allocate absurd amounts before the
// byte-level checks fail: every entry needs at least a few bytes of file.
constexpr int kMaxDims = 4;
constexpr uint64_t kMaxArrayDepth = 4;

// A bounds-checked little-endian cursor over the file bytes.
class Reader {
 public:
  Reader(std::span<const uint8_t> bytes, const std::string& name) : bytes_(bytes), name_(name) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::DataLossError(absl::StrFormat(
          "%s: truncated: %s needs %d bytes at offset %d but the file has %d", name_, what, n,
          pos_, bytes_.size()));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    QKV_RETURN_IF_ERROR(Need(sizeof(T), what));
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  absl::StatusOr<std::string_view> ReadString(std::string_view what) {
    QKV_ASSIGN_OR_RETURN(uint64_t len, Read<uint64_t>(what));
    QKV_RETURN_IF_ERROR(Need(len, what));
    std::string_view s(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
    pos_ += len;
    return s;
  }

  absl::Status Skip(uint64_t n, std::string_view what) {
    QKV_RETURN_IF_ERROR(Need(n, what));
    pos_ += n;
    return absl::OkStatus();
  }

  const uint8_t* here() const { return bytes_.data() + pos_; }

 private:
  std::span<const uint8_t> bytes_;
  const std::string& name_;
  size_t pos_ = 0;
};

// Size of a fixed-size element type; 0 for strings and arrays.
uint64_t FixedSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool IsKnownType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }
bool IsInteger(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

// Decodes one fixed-size scalar at p into the kv's payload fields.
void DecodeScalar(GgufValueType t, const uint8_t* p, GgufKv& kv) {
  auto load = [p](auto v) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  switch (t) {
    case GgufValueType::kUint8: kv.u = load(uint8_t{}); kv.i = kv.u; break;
    case GgufValueType::kInt8: kv.i = load(int8_t{}); kv.u = kv.i; break;
    case GgufValueType::kUint16: kv.u = load(uint16_t{}); kv.i = kv.u; break;
    case GgufValueType::kInt16: kv.i = load(int16_t{}); kv.u = kv.i; break;
    case GgufValueType::kUint32: kv.u = load(uint32_t{}); kv.i = kv.u; break;
    case GgufValueType::kInt32: kv.i = load(int32_t{}); kv.u = kv.i; break;
    case GgufValueType::kUint64: kv.u = load(uint64_t{}); kv.i = static_cast<int64_t>(kv.u); break;
    case GgufValueType::kInt64: kv.i = load(int64_t{}); kv.u = kv.i; break;
    case GgufValueType::kFloat32: kv.f = load(float{}); break;
    case GgufValueType::kFloat64: kv.f = load(double{}); break;
    case GgufValueType::kBool: kv.b = load(uint8_t{}) != 0; break;
    default: break;
  }
}

// Skips a (possibly nested) array value; used for arrays of arrays, which we keep opaque.
absl::Status SkipArray(Reader& r, const std::string& file, const std::string& key,
                       uint64_t depth) {
  if (depth > kMaxArrayDepth) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: key '%s': arrays nested too deep", file, key));
  }
  QKV_ASSIGN_OR_RETURN(uint32_t elem, r.Read<uint32_t>("array element type of " + key));
  QKV_ASSIGN_OR_RETURN(uint64_t count, r.Read<uint64_t>("array length of " + key));
  if (!IsKnownType(elem)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: key '%s': unknown array element type %d", file, key, elem));
  }
  const auto et = static_cast<GgufValueType>(elem);
  if (const uint64_t size = FixedSize(et); size != 0) {
    if (count > r.remaining() / size) return r.Need(std::numeric_limits<uint64_t>::max(), key);
    return r.Skip(count * size, key);
  }
  for (uint64_t i = 0; i < count; ++i) {
    if (et == GgufValueType::kString) {
      QKV_RETURN_IF_ERROR(r.ReadString(key).status());
    } else {
      QKV_RETURN_IF_ERROR(SkipArray(r, file, key, depth + 1));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view GgufValueTypeName(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8: return "uint8";
    case GgufValueType::kInt8: return "int8";
    case GgufValueType::kUint16: return "uint16";
    case GgufValueType::kInt16: return "int16";
    case GgufValueType::kUint32: return "uint32";
    case GgufValueType::kInt32: return "int32";
    case GgufValueType::kFloat32: return "float32";
    case GgufValueType::kBool: return "bool";
    case GgufValueType::kString: return "string";
    case GgufValueType::kArray: return "array";
    case GgufValueType::kUint64: return "uint64";
    case GgufValueType::kInt64: return "int64";
    case GgufValueType::kFloat64: return "float64";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path,
                                                         MappedFile::Mode mode) {
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map, MappedFile::Open(path, mode));
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->name_ = path;
  std::span<const uint8_t> bytes(map->data(), map->size());
  file->map_ = std::move(map);
  QKV_RETURN_IF_ERROR(file->ParseAll(bytes));
  return file;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(std::span<const uint8_t> bytes,
                                                          std::string name) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->name_ = std::move(name);
  QKV_RETURN_IF_ERROR(file->ParseAll(bytes));
  return file;
}

absl::Status GgufFile::ParseAll(std::span<const uint8_t> bytes) {
  Reader r(bytes, name_);
  QKV_ASSIGN_OR_RETURN(uint32_t magic, r.Read<uint32_t>("magic"));
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: not a GGUF file (magic 0x%08x, expected 'GGUF')", name_, magic));
  }
  QKV_ASSIGN_OR_RETURN(version_, r.Read<uint32_t>("version"));
  if (version_ != 2 && version_ != 3) {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: GGUF version %d is not supported (only 2 and 3)", name_, version_));
  }
  QKV_ASSIGN_OR_RETURN(uint64_t n_tensors, r.Read<uint64_t>("tensor count"));
  QKV_ASSIGN_OR_RETURN(uint64_t n_kv, r.Read<uint64_t>("metadata count"));
  // Each kv needs >= 12 bytes and each tensor info >= 24: reject counts the file cannot hold
  // before reserving anything.
  if (n_kv > r.remaining() / 12 || n_tensors > r.remaining() / 24) {
    return absl::DataLossError(absl::StrFormat(
        "%s: header claims %d metadata entries and %d tensors, more than the %d-byte file "
        "can hold",
        name_, n_kv, n_tensors, bytes.size()));
  }

  kvs_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    GgufKv kv;
    QKV_ASSIGN_OR_RETURN(std::string_view key, r.ReadString(absl::StrFormat("key #%d", i)));
    kv.key = std::string(key);
    QKV_ASSIGN_OR_RETURN(uint32_t type, r.Read<uint32_t>("value type of " + kv.key));
    if (!IsKnownType(type)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: key '%s' has unknown value type %d", name_, kv.key, type));
    }
    kv.type = static_cast<GgufValueType>(type);
    if (kv.type == GgufValueType::kString) {
      QKV_ASSIGN_OR_RETURN(kv.str, r.ReadString("value of " + kv.key));
    } else if (kv.type == GgufValueType::kArray) {
      QKV_ASSIGN_OR_RETURN(uint32_t elem, r.Read<uint32_t>("array type of " + kv.key));
      QKV_ASSIGN_OR_RETURN(kv.count, r.Read<uint64_t>("array length of " + kv.key));
      if (!IsKnownType(elem)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: key '%s' is an array of unknown type %d", name_, kv.key, elem));
      }
      kv.elem_type = static_cast<GgufValueType>(elem);
      if (const uint64_t size = FixedSize(kv.elem_type); size != 0) {
        if (kv.count > r.remaining() / size) {
          return absl::DataLossError(absl::StrFormat(
              "%s: key '%s': array of %d %s runs past the end of the file", name_, kv.key,
              kv.count, GgufValueTypeName(kv.elem_type)));
        }
        kv.array_data = r.here();
        QKV_RETURN_IF_ERROR(r.Skip(kv.count * size, kv.key));
      } else if (kv.elem_type == GgufValueType::kString) {
        if (kv.count > r.remaining() / 8) {
          return absl::DataLossError(absl::StrFormat(
              "%s: key '%s': %d strings cannot fit in the file", name_, kv.key, kv.count));
        }
        kv.strings.reserve(kv.count);
        for (uint64_t j = 0; j < kv.count; ++j) {
          auto s = r.ReadString(kv.key);
          if (!s.ok()) {
            return absl::DataLossError(absl::StrFormat("%s: key '%s' element %d: %s", name_,
                                                       kv.key, j, s.status().message()));
          }
          kv.strings.push_back(*s);
        }
      } else {
        // Arrays of arrays: legal, kept opaque (no model key we read uses them).
        for (uint64_t j = 0; j < kv.count; ++j) {
          QKV_RETURN_IF_ERROR(SkipArray(r, name_, kv.key, 1));
        }
      }
    } else {
      const uint64_t size = FixedSize(kv.type);
      QKV_RETURN_IF_ERROR(r.Need(size, "value of " + kv.key));
      DecodeScalar(kv.type, r.here(), kv);
      QKV_RETURN_IF_ERROR(r.Skip(size, kv.key));
    }
    if (kv_index_.contains(kv.key)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: duplicate metadata key '%s'", name_, kv.key));
    }
    kv_index_[kv.key] = kvs_.size();
    kvs_.push_back(std::move(kv));
  }

  if (const GgufKv* a = Find("general.alignment")) {
    if (!IsInteger(a->type) || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > (1u << 20)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: general.alignment must be a power-of-two integer, got %s %d", name_,
          GgufValueTypeName(a->type), a->i));
    }
    alignment_ = a->u;
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    QKV_ASSIGN_OR_RETURN(std::string_view tname,
                         r.ReadString(absl::StrFormat("name of tensor #%d", i)));
    t.name = std::string(tname);
    QKV_ASSIGN_OR_RETURN(uint32_t n_dims, r.Read<uint32_t>("dimension count of " + t.name));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' has %d dimensions (1..%d allowed)", name_, t.name, n_dims, kMaxDims));
    }
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      QKV_ASSIGN_OR_RETURN(uint64_t dim, r.Read<uint64_t>("dimensions of " + t.name));
      if (dim == 0 || dim > (1ull << 40) ||
          static_cast<uint64_t>(n_elements) > (1ull << 50) / dim) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: tensor '%s' dimension %d = %d is zero or overflows", name_, t.name, d, dim));
      }
      n_elements *= static_cast<int64_t>(dim);
      t.dims.push_back(static_cast<int64_t>(dim));
    }
    QKV_ASSIGN_OR_RETURN(uint32_t type, r.Read<uint32_t>("type of " + t.name));
    const kernels::GgmlTypeInfo* info = kernels::FindGgmlType(type);
    if (info == nullptr) {
      return absl::UnimplementedError(
          absl::StrFormat("%s: tensor '%s' has unknown ggml type %d", name_, t.name, type));
    }
    t.type = info->type;
    if (t.dims[0] % info->block_size != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' row of %d elements is not a multiple of the %s block size %d", name_,
          t.name, t.dims[0], info->name, info->block_size));
    }
    t.n_elements = n_elements;
    t.n_bytes = n_elements / info->block_size * info->type_size;
    QKV_ASSIGN_OR_RETURN(t.offset, r.Read<uint64_t>("offset of " + t.name));
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' offset %d is not a multiple of the alignment %d", name_, t.name,
          t.offset, alignment_));
    }
    if (tensor_index_.contains(t.name)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: duplicate tensor name '%s'", name_, t.name));
    }
    tensor_index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t data_start = (r.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (n_tensors > 0 && data_start > bytes.size()) {
    return absl::DataLossError(
        absl::StrFormat("%s: truncated before the tensor data section (offset %d, size %d)",
                        name_, data_start, bytes.size()));
  }
  const uint64_t data_size = bytes.size() - std::min<uint64_t>(data_start, bytes.size());
  for (GgufTensor& t : tensors_) {
    if (t.offset > data_size || static_cast<uint64_t>(t.n_bytes) > data_size - t.offset) {
      return absl::DataLossError(absl::StrFormat(
          "%s: tensor '%s' data [%d, %d) runs past the end of the data section (%d bytes)",
          name_, t.name, t.offset, t.offset + t.n_bytes, data_size));
    }
    t.data = bytes.data() + data_start + t.offset;
  }
  return absl::OkStatus();
}

const GgufKv* GgufFile::Find(std::string_view key) const {
  auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kvs_[it->second];
}

const GgufTensor* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const GgufTensor*> GgufFile::GetTensor(std::string_view name) const {
  if (const GgufTensor* t = FindTensor(name)) return t;
  return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", name_, name));
}

namespace {
absl::Status Missing(const std::string& file, std::string_view key) {
  return absl::NotFoundError(absl::StrFormat("%s: missing metadata key '%s'", file, key));
}
absl::Status WrongType(const std::string& file, const GgufKv& kv, std::string_view want) {
  std::string got(GgufValueTypeName(kv.type));
  if (kv.type == GgufValueType::kArray) got += absl::StrCat(" of ", std::string(GgufValueTypeName(kv.elem_type)));
  return absl::InvalidArgumentError(absl::StrFormat("%s: metadata key '%s' is %s, expected %s",
                                                    file, kv.key, got, want));
}
}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type != GgufValueType::kString) return WrongType(name_, *kv, "string");
  return std::string(kv->str);
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (!IsInteger(kv->type)) return WrongType(name_, *kv, "an integer");
  if (kv->type == GgufValueType::kUint64 && kv->u > static_cast<uint64_t>(INT64_MAX)) {
    return absl::OutOfRangeError(
        absl::StrFormat("%s: metadata key '%s' = %d is out of range", name_, key, kv->u));
  }
  return kv->i;
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type == GgufValueType::kFloat32 || kv->type == GgufValueType::kFloat64) return kv->f;
  // kv->i of a uint64 above INT64_MAX is negative; its unsigned value is the number.
  if (kv->type == GgufValueType::kUint64) return static_cast<double>(kv->u);
  if (IsInteger(kv->type)) return static_cast<double>(kv->i);
  return WrongType(name_, *kv, "a number");
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type != GgufValueType::kBool) return WrongType(name_, *kv, "bool");
  return kv->b;
}

absl::StatusOr<std::vector<std::string_view>> GgufFile::GetStringArray(
    std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type != GgufValueType::kArray || kv->elem_type != GgufValueType::kString) {
    return WrongType(name_, *kv, "array of string");
  }
  return kv->strings;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type != GgufValueType::kArray || FixedSize(kv->elem_type) == 0 ||
      kv->elem_type == GgufValueType::kBool) {
    return WrongType(name_, *kv, "array of numbers");
  }
  std::vector<double> out(kv->count);
  const uint64_t size = FixedSize(kv->elem_type);
  for (uint64_t i = 0; i < kv->count; ++i) {
    GgufKv tmp;
    DecodeScalar(kv->elem_type, kv->array_data + i * size, tmp);
    if (kv->elem_type == GgufValueType::kFloat32 || kv->elem_type == GgufValueType::kFloat64) {
      out[i] = tmp.f;
    } else if (kv->elem_type == GgufValueType::kUint64) {
      out[i] = static_cast<double>(tmp.u);  // tmp.i would be negative above INT64_MAX
    } else {
      out[i] = static_cast<double>(tmp.i);
    }
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufKv* kv = Find(key);
  if (kv == nullptr) return Missing(name_, key);
  if (kv->type != GgufValueType::kArray || !IsInteger(kv->elem_type)) {
    return WrongType(name_, *kv, "array of integers");
  }
  std::vector<int64_t> out(kv->count);
  const uint64_t size = FixedSize(kv->elem_type);
  for (uint64_t i = 0; i < kv->count; ++i) {
    GgufKv tmp;
    DecodeScalar(kv->elem_type, kv->array_data + i * size, tmp);
    // Same rule as GetInt: a uint64 that does not fit int64 is an error, not a wrap.
    if (kv->elem_type == GgufValueType::kUint64 && tmp.u > static_cast<uint64_t>(INT64_MAX)) {
      return absl::OutOfRangeError(absl::StrFormat(
          "%s: metadata key '%s' element %d = %d is out of range", name_, key, i, tmp.u));
    }
    out[i] = tmp.i;
  }
  return out;
}

absl::StatusOr<int64_t> GgufFile::GetIntOr(std::string_view key, int64_t fallback) const {
  return Has(key) ? GetInt(key) : absl::StatusOr<int64_t>(fallback);
}
absl::StatusOr<double> GgufFile::GetFloatOr(std::string_view key, double fallback) const {
  return Has(key) ? GetFloat(key) : absl::StatusOr<double>(fallback);
}
absl::StatusOr<std::string> GgufFile::GetStringOr(std::string_view key,
                                                  std::string fallback) const {
  return Has(key) ? GetString(key) : absl::StatusOr<std::string>(std::move(fallback));
}
absl::StatusOr<bool> GgufFile::GetBoolOr(std::string_view key, bool fallback) const {
  return Has(key) ? GetBool(key) : absl::StatusOr<bool>(fallback);
}

}  // namespace quantkv
