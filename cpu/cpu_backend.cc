#include "cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "model/quantization.h"
#include "model/rope.h"
#include "model/shard_pick.h"

namespace gemma2 {
namespace {

float RmsScale(const float* x, int64_t n, float eps) {
  double ss = 0;  // fp64 sum: the fp32 reference is within its rounding of this
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
}

void NormRow(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float s = RmsScale(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * s * (1.0f + w[i]);
}

void Rotate(float* x, int64_t head_dim, const float* cos_t, const float* sin_t) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos_t[i] - b * sin_t[i];
    x[i + half] = b * cos_t[i] + a * sin_t[i];
  }
}

}  // namespace

void SetCpuMathThreads(int threads) { openblas_set_num_threads(std::max(1, threads)); }

Result<Tensor> CpuBackend::Upload(const void* host, DType dtype, int64_t rows, int64_t cols) {
  Tensor t = Alloc(rows, cols);
  ConvertToF32(dtype, host, t.as<float>(), rows * cols);
  return t;
}

Status CpuBackend::QuantizeFp8(Tensor& w) {
  if (w.dtype != DType::kF32) return Internal("cpu backend: QuantizeFp8 of a non-fp32 weight");
  std::vector<uint8_t> q(static_cast<size_t>(w.numel()));
  std::vector<float> scale(static_cast<size_t>(w.rows));
  QuantizeRowsFp8(w.as<float>(), w.rows, w.cols, q.data(), scale.data());
  float* v = w.as<float>();
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t k = 0; k < w.cols; ++k) {
      const size_t i = static_cast<size_t>(r * w.cols + k);
      v[i] = F8E4M3ToF32(q[i]) * scale[static_cast<size_t>(r)];
    }
  }
  return OkStatus();
}

Result<Tensor> CpuBackend::UploadRows(DType dtype, int64_t rows, int64_t cols,
                                      const RowFiller& fill) {
  if (dtype != DType::kF32) return Backend::UploadRows(dtype, rows, cols, fill);
  Tensor t = Alloc(rows, cols);  // filled in place
  RETURN_IF_ERROR(fill(0, rows, t.data));
  return t;
}

Tensor CpuBackend::Alloc(int64_t rows, int64_t cols) {
  Tensor t;
  const size_t n = static_cast<size_t>(std::max<int64_t>(1, rows * cols));
  t.storage = std::shared_ptr<void>(new float[n], [](void* p) { delete[] static_cast<float*>(p); });
  t.data = t.storage.get();
  t.rows = rows;
  t.cols = cols;
  t.dtype = DType::kF32;
  return t;
}

Status CpuBackend::ToHost(const Tensor& t, float* host) {
  std::memcpy(host, t.data, static_cast<size_t>(t.numel()) * sizeof(float));
  return OkStatus();
}

Status CpuBackend::SampleToHost(const Tensor& logits, std::span<const RowSampling> rows,
                                int32_t* ids) {
  for (int64_t r = 0; r < logits.rows; ++r) {
    const float* row = logits.as<float>() + r * logits.cols;
    ids[r] = SampleRow({row, static_cast<size_t>(logits.cols)}, rows[static_cast<size_t>(r)]);
  }
  return OkStatus();
}

Result<int64_t> CpuBackend::CreateKvPool(std::span<const KvGroup> layer_groups, int64_t kv_heads,
                                         int64_t head_dim, int64_t block_size, int64_t blocks,
                                         KvCacheDtype dtype) {
  if (kv_.blocks > 0) return Internal("cpu backend: the KV pool exists already");
  if (block_size <= 0) return InvalidArgument("KV block size must be positive");
  KvPool& p = kv_;
  p.layers = KvLayerSlots(layer_groups);
  p.width = kv_heads * head_dim;
  p.fp8 = dtype == KvCacheDtype::kFp8;
  p.block_size = block_size;
  p.blocks = blocks > 0 ? blocks : kCpuDefaultKvBlocks;  // host memory: taken as blocks are used
  p.k.resize(static_cast<size_t>(p.blocks));
  p.v.resize(static_cast<size_t>(p.blocks));
  return p.blocks;
}

Status CpuBackend::BeginStep(std::span<const SeqSlice> seqs, StepOutputKind, bool) {
  if (kv_.blocks == 0 && !seqs.empty()) return Internal("cpu backend: no KV pool");
  return CheckNewPositionsMapped(seqs, kv_.layers.group, kv_.block_size, kv_.blocks);
}

Status CpuBackend::CopyKvBlocks(std::span<const int32_t> from, std::span<const int32_t> to) {
  // The ids come from the rank's checked block tables; the op checks them again, as the cuda twin
  // does, so no caller can reach past the pool.
  const auto in_pool = [&](int32_t b) { return b >= 0 && static_cast<size_t>(b) < kv_.k.size(); };
  if (from.size() != to.size()) return InvalidArgument("KV block copy: unequal block lists");
  for (size_t i = 0; i < from.size(); ++i) {
    if (!in_pool(from[i]) || !in_pool(to[i])) {
      return InvalidArgument("KV block copy: block " + std::to_string(in_pool(from[i]) ? to[i] : from[i]) +
                             " is outside the pool of " + std::to_string(kv_.k.size()));
    }
  }
  for (size_t i = 0; i < from.size(); ++i) {
    for (auto* side : {&kv_.k, &kv_.v}) {
      std::vector<float>& dst = (*side)[static_cast<size_t>(to[i])];
      const std::vector<float>& src = (*side)[static_cast<size_t>(from[i])];
      if (src.empty()) {
        dst.clear();
      } else {
        dst = src;
      }
    }
  }
  return OkStatus();
}

float* CpuBackend::KvRow(bool v, int64_t layer, const SeqSlice& s, int64_t pos) {
  const KvGroup g = kv_.layers.group[static_cast<size_t>(layer)];
  const int32_t block = s.blocks[static_cast<size_t>(g)][static_cast<size_t>(pos / kv_.block_size)];
  std::vector<float>& mem = (v ? kv_.v : kv_.k)[static_cast<size_t>(block)];
  if (mem.empty()) {
    mem.assign(static_cast<size_t>(kv_.layers.slots * kv_.block_size * kv_.width), 0.0f);
  }
  const int64_t slot = kv_.layers.slot[static_cast<size_t>(layer)];
  return mem.data() + (slot * kv_.block_size + pos % kv_.block_size) * kv_.width;
}

void CpuBackend::Embed(std::span<const int32_t> ids, const Tensor& table, int64_t vocab_begin,
                       float scale, Tensor& out) {
  const int64_t h = table.cols;
  for (size_t i = 0; i < ids.size(); ++i) {
    float* dst = out.as<float>() + static_cast<int64_t>(i) * h;
    const int64_t row = ids[i] - vocab_begin;
    if (row < 0 || row >= table.rows) {
      std::fill(dst, dst + h, 0.0f);
      continue;
    }
    const float* src = table.as<float>() + row * h;
    for (int64_t j = 0; j < h; ++j) dst[j] = src[j] * scale;
  }
}

void CpuBackend::RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) {
  for (int64_t r = 0; r < x.rows; ++r) {
    NormRow(x.as<float>() + r * x.cols, w.as<float>(), x.cols, eps, out.as<float>() + r * x.cols);
  }
}

void CpuBackend::AddRmsNorm(Tensor& residual, const Tensor& delta, const Tensor& post_w,
                            const Tensor* next_w, float eps, Tensor& normed) {
  const int64_t n = residual.cols;
  std::vector<float> tmp(static_cast<size_t>(n));
  for (int64_t r = 0; r < residual.rows; ++r) {
    float* res = residual.as<float>() + r * n;
    NormRow(delta.as<float>() + r * n, post_w.as<float>(), n, eps, tmp.data());
    for (int64_t i = 0; i < n; ++i) res[i] += tmp[static_cast<size_t>(i)];
    if (next_w) NormRow(res, next_w->as<float>(), n, eps, normed.as<float>() + r * n);
  }
}

void CpuBackend::Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) {
  const int64_t t = x.rows, k = x.cols, n = w.rows;
  if (t == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(t), static_cast<int>(n),
              static_cast<int>(k), 1.0f, x.as<float>(), static_cast<int>(k), w.as<float>(),
              static_cast<int>(k), 0.0f, out.as<float>(), static_cast<int>(n));
  if (bias) {
    for (int64_t r = 0; r < t; ++r) {
      for (int64_t j = 0; j < n; ++j) out.as<float>()[r * n + j] += bias->as<float>()[j];
    }
  }
}

void CpuBackend::RopeAndCacheWrite(Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                                   const AttentionParams& p) {
  const int64_t hd = p.head_dim, q_width = p.q_heads * hd, kv_width = p.kv_heads * hd;
  const std::vector<float>& inv_freq = InvFreq(hd, p.rope_theta);
  std::vector<float> cos_t(static_cast<size_t>(hd / 2)), sin_t(static_cast<size_t>(hd / 2));
  for (const SeqSlice& s : seqs) {
    for (int64_t t = 0; t < s.num_tokens; ++t) {
      const float pos = static_cast<float>(s.start_pos + t);
      for (size_t i = 0; i < inv_freq.size(); ++i) {
        const float angle = pos * inv_freq[i];  // fp32 product, as the reference
        cos_t[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_t[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      float* row = qkv.as<float>() + (s.row_begin + t) * qkv.cols;
      for (int64_t h = 0; h < p.q_heads + p.kv_heads; ++h) {
        Rotate(row + h * hd, hd, cos_t.data(), sin_t.data());  // q heads then k heads
      }
      if (kv_.fp8) {  // k and v become what their FP8 form gives back (model/quantization.h)
        RoundRowsThroughFp8(row + q_width, p.kv_heads, hd);
        RoundRowsThroughFp8(row + q_width + kv_width, p.kv_heads, hd);
      }
      std::copy(row + q_width, row + q_width + kv_width, KvRow(false, layer, s, s.start_pos + t));
      std::copy(row + q_width + kv_width, row + q_width + 2 * kv_width,
                KvRow(true, layer, s, s.start_pos + t));
    }
  }
}

const std::vector<float>& CpuBackend::InvFreq(int64_t head_dim, double theta) {
  auto it = inv_freq_.find({head_dim, theta});
  if (it == inv_freq_.end())
    it = inv_freq_.emplace(std::pair{head_dim, theta}, RopeInvFreq(head_dim, theta)).first;
  return it->second;
}

void CpuBackend::Attention(const Tensor& qkv, std::span<const SeqSlice> seqs, int64_t layer,
                           const AttentionParams& p, Tensor& out) {
  const int64_t hd = p.head_dim, group = p.q_heads / p.kv_heads;
  std::vector<float> scores;
  for (const SeqSlice& s : seqs) {
    for (int64_t t = 0; t < s.num_tokens; ++t) {
      const int64_t pos = s.start_pos + t;
      const int64_t first = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
      const float* q_row = qkv.as<float>() + (s.row_begin + t) * qkv.cols;
      float* o_row = out.as<float>() + (s.row_begin + t) * out.cols;
      scores.resize(static_cast<size_t>(pos - first + 1));
      for (int64_t h = 0; h < p.q_heads; ++h) {
        const float* q = q_row + h * hd;
        const int64_t g = h / group;
        float max_s = -INFINITY;
        for (int64_t k = first; k <= pos; ++k) {
          const float* key = KvRow(false, layer, s, k) + g * hd;
          float dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += q[d] * key[d];
          float sc = dot * p.scale;
          if (p.softcap > 0) sc = std::tanh(sc / p.softcap) * p.softcap;
          scores[static_cast<size_t>(k - first)] = sc;
          max_s = std::max(max_s, sc);
        }
        double denom = 0;
        for (float& sc : scores) {
          sc = std::exp(sc - max_s);
          denom += sc;
        }
        float* o = o_row + h * hd;
        std::fill(o, o + hd, 0.0f);
        for (int64_t k = first; k <= pos; ++k) {
          const float w = static_cast<float>(scores[static_cast<size_t>(k - first)] / denom);
          const float* val = KvRow(true, layer, s, k) + g * hd;
          for (int64_t d = 0; d < hd; ++d) o[d] += w * val[d];
        }
      }
    }
  }
}

void CpuBackend::GeluTanhMul(const Tensor& gate_up, Tensor& out) {
  const int64_t n = out.cols;
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  for (int64_t r = 0; r < out.rows; ++r) {
    const float* g = gate_up.as<float>() + r * gate_up.cols;
    const float* u = g + n;
    float* o = out.as<float>() + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float x = g[i];
      const float gelu = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
      o[i] = gelu * u[i];
    }
  }
}

void CpuBackend::Softcap(Tensor& x, float cap) {
  float* p = x.as<float>();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = std::tanh(p[i] / cap) * cap;
}

void CpuBackend::MaskTokens(Tensor& logits, std::span<const TokenMaskWords> masks,
                            std::span<const int32_t> row_mask, int64_t vocab_begin) {
  for (int64_t r = 0; r < logits.rows; ++r) {
    if (row_mask[static_cast<size_t>(r)] < 0) continue;
    const uint64_t* m = masks[static_cast<size_t>(row_mask[static_cast<size_t>(r)])].data();
    float* row = logits.as<float>() + r * logits.cols;
    for (int64_t j = 0; j < logits.cols; ++j) {
      const int64_t t = vocab_begin + j;
      if (!((m[t >> 6] >> (t & 63)) & 1)) row[j] = -INFINITY;
    }
  }
}

void CpuBackend::GatherRows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) {
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(out.as<float>() + static_cast<int64_t>(i) * x.cols,
                x.as<float>() + rows[i] * x.cols, static_cast<size_t>(x.cols) * sizeof(float));
  }
}

void CpuBackend::ScatterColumns(const Tensor& src, int64_t col_offset, Tensor& dst) {
  std::fill(dst.as<float>(), dst.as<float>() + dst.numel(), 0.0f);
  for (int64_t r = 0; r < src.rows; ++r) {
    std::memcpy(dst.as<float>() + r * dst.cols + col_offset, src.as<float>() + r * src.cols,
                static_cast<size_t>(src.cols) * sizeof(float));
  }
}

void CpuBackend::ShardBestScores(const Tensor& local, std::span<const RowSampling> rows,
                                 int64_t vocab_begin, int rank, int tp, Tensor& exchange) {
  std::span<float> ex(exchange.as<float>(), static_cast<size_t>(exchange.numel()));
  std::fill(ex.begin(), ex.end(), 0.0f);
  FillShardPick({local.as<float>(), static_cast<size_t>(local.numel())}, local.rows, local.cols,
                vocab_begin, rows, rank, tp, /*width=*/2, ex);
}

Status CpuBackend::ShardPickToHost(const Tensor& exchange, int tp, int32_t* ids) {
  DecideShardBest({exchange.as<float>(), static_cast<size_t>(exchange.numel())}, exchange.rows, tp,
                  ids);
  return OkStatus();
}

}  // namespace gemma2
