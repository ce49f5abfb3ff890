// Safetensors files: header validation (fuzzed) and a read-only mmap of the data.
// Format: u64 little-endian header length N, N bytes of UTF-8 JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace gemma2 {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets inside the data section
  int64_t end = 0;
  int64_t num_elements() const;
};

struct SafetensorsHeader {
  int64_t data_offset = 0;  // 8 + header length: where the data section starts in the file
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

// Largest header accepted (the format's own limit is 100 MB).
inline constexpr int64_t kMaxSafetensorsHeader = 100'000'000;

// Validates a whole file given as bytes [data, data + file_size): the header length fits, the
// header is a UTF-8 JSON object of the right shape, every dtype is known, shape x dtype size equals
// the byte range, ranges lie inside the data section and do not overlap. Errors name `file` and the
// tensor. Reads only the first 8 + N bytes of `data`; `file_size` bounds the data section.
Result<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, int64_t available,
                                                 int64_t file_size, const std::string& file);

// A safetensors file: its header validated, its data read with ReadAt (the loader: an I/O error or
// a file cut short after Open is a Status) or through a read-only map (TensorData: small files,
// tests). Not copyable; closes and unmaps on destruction.
class SafetensorsFile {
 public:
  static Result<std::unique_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // Pointer to the first byte of `t`'s data (t must come from this file's header).
  const uint8_t* TensorData(const TensorInfo& t) const {
    return base_ + header_.data_offset + t.begin;
  }
  // Where `t`'s data starts in the file.
  int64_t TensorOffset(const TensorInfo& t) const { return header_.data_offset + t.begin; }
  // Copies bytes [offset, offset + bytes) of the file into dst; safe from several threads.
  Status ReadAt(int64_t offset, int64_t bytes, void* dst) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  int fd_ = -1;
  const uint8_t* base_ = nullptr;
  int64_t size_ = 0;
  SafetensorsHeader header_;
};

// Writes tensors in safetensors format (used by our checkpoint tool and tests).
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
Status WriteSafetensors(const std::filesystem::path& path,
                        const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

}  // namespace gemma2
