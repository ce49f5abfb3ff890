#include "model/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "common/json_depth.h"

namespace gemma2 {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

Result<std::map<std::string, std::string>> ReadWeightMap(const fs::path& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) return NotFound(index_path.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  if (!JsonNestingWithin(text, kMaxPeerJsonDepth))
    return DataLoss(index_path.string() + ": JSON nested deeper than " +
                    std::to_string(kMaxPeerJsonDepth) + " levels");
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return DataLoss(index_path.string() + ": not a JSON object");
  }
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) {
    return DataLoss(index_path.string() + ": missing 'weight_map'");
  }
  std::map<std::string, std::string> out;
  for (const auto& [name, file] : wm->items()) {
    if (!file.is_string())
      return DataLoss(index_path.string() + ": weight_map values must be file names");
    const std::string f = file.get<std::string>();
    // Shards live beside the index: no directories, no way out of the checkpoint.
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..") {
      return DataLoss(index_path.string() + ": weight_map names an invalid shard file '" + f + "'");
    }
    out[name] = f;
  }
  return out;
}

}  // namespace

Result<std::unique_ptr<Checkpoint>> Checkpoint::Open(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return NotFound(dir.string() + ": not a checkpoint directory");
  std::unique_ptr<Checkpoint> ck(new Checkpoint());
  ck->dir_ = dir;
  ASSIGN_OR_RETURN(ck->config_, LoadModelConfig(dir / "config.json"));
  {
    std::ifstream in(dir / "config.json", std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    const json config = json::parse(text.str(), nullptr, false);  // LoadModelConfig checked it
    ASSIGN_OR_RETURN(ck->fp8_, Fp8SchemeFromConfig(config, (dir / "config.json").string()));
  }
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(single, ec)) {
    RETURN_IF_ERROR(ck->OpenFiles({"model.safetensors"}, nullptr));
  } else if (fs::exists(index, ec)) {
    ASSIGN_OR_RETURN(auto weight_map, ReadWeightMap(index));
    std::set<std::string> unique;
    for (const auto& [name, f] : weight_map) unique.insert(f);
    RETURN_IF_ERROR(ck->OpenFiles({unique.begin(), unique.end()}, &weight_map));
  } else {
    return NotFound(dir.string() +
                    ": has neither model.safetensors nor model.safetensors.index.json");
  }
  return ck;
}

Status Checkpoint::OpenFiles(const std::vector<std::string>& files,
                             const std::map<std::string, std::string>* weight_map) {
  for (const auto& f : files) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir_ / f));
    for (const auto& [name, info] : file->header().tensors) {
      if (weight_map) {
        auto it = weight_map->find(name);
        if (it == weight_map->end() || it->second != f) continue;  // index is authoritative
      }
      if (tensors_.count(name)) {
        return DataLoss(file->path() + ": tensor '" + name + "' appears in more than one file");
      }
      tensors_[name] = Entry{file.get(), &info};
    }
    files_.push_back(std::move(file));
  }
  if (weight_map) {
    for (const auto& [name, f] : *weight_map) {
      if (!tensors_.count(name)) {
        return DataLoss((dir_ / f).string() + ": tensor '" + name +
                        "' is listed in the index but missing from the file");
      }
    }
  }
  return OkStatus();
}

fs::path Checkpoint::tokenizer_path() const {
  std::error_code ec;
  const fs::path p = dir_ / "tokenizer.model";
  return fs::is_regular_file(p, ec) ? p : fs::path();
}

const Checkpoint::Entry* Checkpoint::Lookup(const std::string& name) const {
  for (const std::string& prefix : {std::string("model."), std::string()}) {
    auto it = tensors_.find(prefix + name);
    if (it != tensors_.end()) return &it->second;
  }
  return nullptr;
}

static std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

Status Checkpoint::CheckShape(const std::string& name, const std::vector<int64_t>& expected) const {
  const Entry* e = Lookup(name);
  if (!e) return NotFound(dir_.string() + ": tensor '" + name + "' is missing from the checkpoint");
  if (e->info->shape != expected) {
    return InvalidArgument(e->file->path() + ": tensor '" + e->info->name + "' has shape " +
                           ShapeString(e->info->shape) + ", expected " + ShapeString(expected) +
                           " from config.json");
  }
  if (e->info->dtype == DType::kF8E4M3 && expected.size() == 2) return ReadScales(*e).status();
  if (!IsWeightDType(e->info->dtype)) {
    return Unimplemented(e->file->path() + ": tensor '" + e->info->name + "' has dtype " +
                         std::string(DTypeName(e->info->dtype)) +
                         "; weights must be BF16, F16 or F32 (or F8_E4M3 with scales)");
  }
  return OkStatus();
}

Result<std::vector<float>> Checkpoint::ReadScales(const Entry& e) const {
  const TensorInfo& t = *e.info;
  const std::string what = e.file->path() + ": FP8 tensor '" + t.name + "'";
  if (fp8_.kind == Fp8Scheme::Kind::kNone) {
    return InvalidArgument(what + " but config.json has no quantization_config naming its scales");
  }
  if (t.shape.size() != 2) return InvalidArgument(what + " is not a matrix");
  const std::string scale_name = fp8_.ScaleName(t.name);
  auto it = tensors_.find(scale_name);
  if (it == tensors_.end()) return NotFound(what + " has no scale tensor '" + scale_name + "'");
  const TensorInfo& s = *it->second.info;
  const std::vector<int64_t> want = fp8_.ScaleShape(t.shape[0], t.shape[1]);
  const bool scalar_ok = fp8_.kind == Fp8Scheme::Kind::kTensor && s.shape.empty();
  if (s.shape != want && !scalar_ok) {
    return InvalidArgument(it->second.file->path() + ": scale tensor '" + scale_name +
                           "' has shape " + ShapeString(s.shape) + ", expected " +
                           ShapeString(want) + " for " + t.name + " " + ShapeString(t.shape));
  }
  if (!IsWeightDType(s.dtype)) {
    return InvalidArgument(it->second.file->path() + ": scale tensor '" + scale_name +
                           "' has dtype " + std::string(DTypeName(s.dtype)) +
                           "; scales must be F32, BF16 or F16");
  }
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  std::vector<uint8_t> raw(static_cast<size_t>(n * DTypeSize(s.dtype)));
  RETURN_IF_ERROR(it->second.file->ReadAt(it->second.file->TensorOffset(s),
                                          static_cast<int64_t>(raw.size()), raw.data()));
  std::vector<float> scales(static_cast<size_t>(n));
  ConvertToF32(s.dtype, raw.data(), scales.data(), n);
  for (float v : scales) {
    if (!std::isfinite(v)) return DataLoss(it->second.file->path() + ": scale tensor '" + scale_name + "' holds a non-finite value");
  }
  return scales;
}

void Checkpoint::WillRead(const std::string& name, const Region& r) const {
  const Entry* e = Lookup(name);
  if (!e || e->info->shape.empty() || e->info->shape.size() > 2) return;
  // The rows the region spans, whole: a column slice needs bytes from every one of them.
  const int64_t rows = e->info->shape.size() == 2 ? e->info->shape[0] : 1;
  const int64_t row_bytes = (e->info->end - e->info->begin) / std::max<int64_t>(rows, 1);
  const int64_t r0 = std::clamp<int64_t>(r.row_begin, 0, rows);
  const int64_t r1 = std::clamp<int64_t>(r.row_end, r0, rows);
  read_ahead_.Add(e->file->path(), e->file->TensorOffset(*e->info) + r0 * row_bytes,
                  (r1 - r0) * row_bytes);
}

Status Checkpoint::ReadRegion(const std::string& name, const Region& r, DType out,
                              void* dst) const {
  const Entry* e = Lookup(name);
  if (!e) return NotFound(dir_.string() + ": tensor '" + name + "' is missing from the checkpoint");
  const TensorInfo& t = *e->info;
  const bool fp8 = t.dtype == DType::kF8E4M3;
  if (!IsWeightDType(t.dtype) && !fp8) {
    return Unimplemented(e->file->path() + ": tensor '" + t.name + "' has non-float dtype " +
                         std::string(DTypeName(t.dtype)));
  }
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : (t.shape.size() == 1 ? t.shape[0] : -1);
  if (cols < 0 || r.row_begin < 0 || r.row_end > rows || r.row_begin > r.row_end ||
      r.col_begin < 0 || r.col_end > cols || r.col_begin > r.col_end) {
    return InvalidArgument(
        e->file->path() + ": tensor '" + t.name + "' of shape " + ShapeString(t.shape) +
        " has no region rows [" + std::to_string(r.row_begin) + ", " + std::to_string(r.row_end) +
        ") cols [" + std::to_string(r.col_begin) + ", " + std::to_string(r.col_end) + ")");
  }
  if (out != DType::kF32 && out != DType::kBF16) {
    return Internal("ReadRegion: unsupported output dtype");
  }
  // pread, not the map: a failing disk or a file cut short mid-load is an error, not a SIGBUS.
  const int64_t esize = DTypeSize(t.dtype), out_size = DTypeSize(out);
  const int64_t base = e->file->TensorOffset(t);
  const int64_t n = r.cols();
  auto* d = static_cast<uint8_t*>(dst);
  if (fp8) {  // dequantized: each value times the scale of its block, row or tensor
    ASSIGN_OR_RETURN(const std::vector<float> scales, ReadScales(*e));
    std::vector<uint8_t> q(static_cast<size_t>(n));
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t row = r.row_begin; row < r.row_end; ++row) {
      RETURN_IF_ERROR(e->file->ReadAt(base + row * cols + r.col_begin, n, q.data()));
      for (int64_t i = 0; i < n; ++i) {
        v[static_cast<size_t>(i)] =
            F8E4M3ToF32(q[static_cast<size_t>(i)]) *
            scales[static_cast<size_t>(fp8_.ScaleIndex(row, r.col_begin + i, cols))];
      }
      uint8_t* drow = d + (row - r.row_begin) * n * out_size;
      if (out == DType::kF32) {
        std::memcpy(drow, v.data(), static_cast<size_t>(n) * 4);
      } else {
        auto* b = reinterpret_cast<uint16_t*>(drow);
        for (int64_t i = 0; i < n; ++i) b[i] = F32ToBf16(v[static_cast<size_t>(i)]);
      }
    }
    return OkStatus();
  }
  if (out == t.dtype && n == cols) {  // whole rows as stored: one read
    return e->file->ReadAt(base + r.row_begin * cols * esize, r.rows() * n * esize, d);
  }
  std::vector<uint8_t> raw(out == t.dtype ? 0 : static_cast<size_t>(n * esize));
  std::vector<float> tmp;
  for (int64_t row = r.row_begin; row < r.row_end; ++row) {
    const int64_t at = base + (row * cols + r.col_begin) * esize;
    uint8_t* drow = d + (row - r.row_begin) * n * out_size;
    if (out == t.dtype) {
      RETURN_IF_ERROR(e->file->ReadAt(at, n * esize, drow));
      continue;
    }
    RETURN_IF_ERROR(e->file->ReadAt(at, n * esize, raw.data()));
    if (out == DType::kF32) {
      ConvertToF32(t.dtype, raw.data(), reinterpret_cast<float*>(drow), n);
    } else {
      tmp.resize(static_cast<size_t>(n));
      ConvertToF32(t.dtype, raw.data(), tmp.data(), n);
      auto* b = reinterpret_cast<uint16_t*>(drow);
      for (int64_t i = 0; i < n; ++i) b[i] = F32ToBf16(tmp[static_cast<size_t>(i)]);
    }
  }
  return OkStatus();
}

}  // namespace gemma2
