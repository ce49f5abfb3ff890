#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/json_depth.h"

namespace gemma2 {
namespace {

using nlohmann::json;

// Deeper nesting than a valid header needs (3) is refused before the JSON parser sees it.
constexpr int kMaxJsonDepth = 8;

// a * b without overflow, or -1.
int64_t CheckedMul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? -1 : r;
}

Status ParseTensorEntry(const std::string& name, const json& v, const std::string& where,
                        TensorInfo* t) {
  if (!v.is_object()) return DataLoss(where + ": entry is not an object");
  auto dt = v.find("dtype");
  auto sh = v.find("shape");
  auto off = v.find("data_offsets");
  if (dt == v.end() || sh == v.end() || off == v.end()) {
    return DataLoss(where + ": needs dtype, shape and data_offsets");
  }
  if (!dt->is_string()) return DataLoss(where + ": dtype is not a string");
  auto dtype = DTypeFromSafetensorsName(dt->get<std::string>());
  if (!dtype) return DataLoss(where + ": unknown dtype '" + dt->get<std::string>() + "'");
  t->name = name;
  t->dtype = *dtype;
  if (!sh->is_array() || sh->size() > 8) return DataLoss(where + ": shape is not a short list");
  int64_t elems = 1;
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned())
      return DataLoss(where + ": shape has a non-integer or negative dim");
    const uint64_t dim = d.get<uint64_t>();
    if (dim > (uint64_t{1} << 40)) return DataLoss(where + ": shape dimension too large");
    t->shape.push_back(static_cast<int64_t>(dim));
    elems = CheckedMul(elems, static_cast<int64_t>(dim));
    if (elems < 0) return DataLoss(where + ": shape overflows");
  }
  if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return DataLoss(where + ": data_offsets must be [begin, end]");
  }
  const uint64_t b = (*off)[0].get<uint64_t>(), e = (*off)[1].get<uint64_t>();
  if (b > e || e > (uint64_t{1} << 62)) return DataLoss(where + ": data_offsets begin > end");
  t->begin = static_cast<int64_t>(b);
  t->end = static_cast<int64_t>(e);
  const int64_t bytes = CheckedMul(elems, DTypeSize(t->dtype));
  if (bytes < 0 || bytes != t->end - t->begin) {
    return DataLoss(where + ": shape x dtype size is " + std::to_string(bytes) +
                    " bytes but data_offsets span " + std::to_string(t->end - t->begin));
  }
  return OkStatus();
}

}  // namespace

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Result<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, int64_t available,
                                                 int64_t file_size, const std::string& file) {
  if (file_size < 8 || available < 8) {
    return DataLoss(file + ": truncated (" + std::to_string(file_size) +
                    " bytes, shorter than the 8-byte header length)");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > static_cast<uint64_t>(kMaxSafetensorsHeader)) {
    return DataLoss(file + ": header length " + std::to_string(n) + " exceeds the 100 MB limit");
  }
  if (static_cast<int64_t>(n) > file_size - 8 || static_cast<int64_t>(n) > available - 8) {
    return DataLoss(file + ": header length " + std::to_string(n) + " runs past the end of the " +
                    std::to_string(file_size) + "-byte file");
  }
  const uint8_t* text = data + 8;
  if (!JsonNestingWithin(std::string_view(reinterpret_cast<const char*>(text), n), kMaxJsonDepth)) {
    return DataLoss(file + ": header JSON is nested too deeply");
  }
  // nlohmann's lexer rejects ill-formed UTF-8 inside strings.
  json j = json::parse(text, text + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return DataLoss(file + ": header is not valid UTF-8 JSON");
  if (!j.is_object()) return DataLoss(file + ": header is not a JSON object");

  SafetensorsHeader h;
  h.data_offset = 8 + static_cast<int64_t>(n);
  const int64_t data_size = file_size - h.data_offset;
  for (const auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return DataLoss(file + ": __metadata__ is not an object");
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string()) return DataLoss(file + ": __metadata__ values must be strings");
        h.metadata[k] = mv.get<std::string>();
      }
      continue;
    }
    TensorInfo t;
    const std::string where = file + ": tensor '" + name + "'";
    RETURN_IF_ERROR(ParseTensorEntry(name, v, where, &t));
    if (t.end > data_size) {
      return DataLoss(where + ": data_offsets end " + std::to_string(t.end) + " lies outside the " +
                      std::to_string(data_size) + "-byte data section");
    }
    h.tensors.emplace(name, std::move(t));
  }
  // No two tensors may share bytes.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& [name, t] : h.tensors) {
    if (t.end > t.begin) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return DataLoss(file + ": tensors '" + by_offset[i - 1]->name + "' and '" +
                      by_offset[i]->name + "' overlap");
    }
  }
  return h;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::filesystem::path& path) {
  const std::string p = path.string();
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFound(p + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return DataLoss(p + ": not a regular file");
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = p;
  f->size_ = st.st_size;
  if (f->size_ > 0) {
    void* m = ::mmap(nullptr, static_cast<size_t>(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      return Internal(p + ": mmap failed: " + std::strerror(errno));
    }
    f->base_ = static_cast<const uint8_t*>(m);
  }
  f->fd_ = fd;
  // The header through ReadAt too: a file that shrinks now is an error, not a SIGBUS.
  std::vector<uint8_t> head(static_cast<size_t>(std::min<int64_t>(f->size_, 8)));
  RETURN_IF_ERROR(f->ReadAt(0, static_cast<int64_t>(head.size()), head.data()));
  if (head.size() == 8) {
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(head[static_cast<size_t>(i)]) << (8 * i);
    if (n <= static_cast<uint64_t>(kMaxSafetensorsHeader)) {  // else the parser refuses it
      const int64_t want = std::min<int64_t>(f->size_, 8 + static_cast<int64_t>(n));
      head.resize(static_cast<size_t>(want));
      RETURN_IF_ERROR(f->ReadAt(0, want, head.data()));
    }
  }
  ASSIGN_OR_RETURN(f->header_, ParseSafetensorsHeader(
                                   head.data(), static_cast<int64_t>(head.size()), f->size_, p));
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), static_cast<size_t>(size_));
  if (fd_ >= 0) ::close(fd_);
}

Status SafetensorsFile::ReadAt(int64_t offset, int64_t bytes, void* dst) const {
  int64_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(fd_, static_cast<uint8_t*>(dst) + done,
                              static_cast<size_t>(bytes - done), static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return DataLoss(path_ + ": read of " + std::to_string(bytes) + " bytes at offset " +
                      std::to_string(offset) + " failed: " + std::strerror(errno));
    }
    if (n == 0) {
      return DataLoss(path_ + ": the file ends before byte " + std::to_string(offset + bytes) +
                      " (it was " + std::to_string(size_) + " bytes when opened)");
    }
    done += n;
  }
  return OkStatus();
}

Status WriteSafetensors(const std::filesystem::path& path,
                        const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    const int64_t n = static_cast<int64_t>(t.bytes.size());
    h[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                 {"shape", t.shape},
                 {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = h.dump();
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');  // align the data section
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Internal(path.string() + ": cannot create");
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(text.size() >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : tensors) {
    out.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
  }
  out.close();
  if (!out) return Internal(path.string() + ": write failed");
  return OkStatus();
}

}  // namespace gemma2
