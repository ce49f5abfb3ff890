#include "cuda/weight_stager.h"

#include <algorithm>
#include <future>
#include <string>
#include <system_error>
#include <vector>

#include "common/cuda_check.h"

namespace gemma2 {

Result<std::unique_ptr<WeightStager>> WeightStager::Create(size_t buffer_bytes) {
  std::unique_ptr<WeightStager> s(new WeightStager());
  s->buffer_bytes_ = buffer_bytes;
  RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&s->stream_, cudaStreamNonBlocking));
  for (int i = 0; i < kBuffers; ++i) {
    RETURN_IF_CUDA_ERROR(cudaHostAlloc(&s->buffers_[i], buffer_bytes, cudaHostAllocDefault));
    RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&s->copied_[i], cudaEventDisableTiming));
  }
  return s;
}

WeightStager::~WeightStager() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (int i = 0; i < kBuffers; ++i) {
    if (copied_[i]) cudaEventDestroy(copied_[i]);
    if (buffers_[i]) cudaFreeHost(buffers_[i]);
  }
  if (stream_) cudaStreamDestroy(stream_);
}

Status WeightStager::Copy(void* device_dst, int64_t rows, int64_t row_bytes,
                          const Backend::RowFiller& fill) {
  if (row_bytes <= 0 || static_cast<size_t>(row_bytes) > buffer_bytes_) {
    return InvalidArgument("weight rows of " + std::to_string(row_bytes) +
                           " bytes do not fit a staging buffer of " +
                           std::to_string(buffer_bytes_) + " bytes");
  }
  const int64_t per_buffer = static_cast<int64_t>(buffer_bytes_) / row_bytes;
  auto* dst = static_cast<uint8_t*>(device_dst);
  for (int64_t r0 = 0; r0 < rows; r0 += per_buffer) {
    const int64_t r1 = std::min(rows, r0 + per_buffer);
    const int i = next_;
    next_ = (next_ + 1) % kBuffers;
    RETURN_IF_CUDA_ERROR(cudaEventSynchronize(copied_[i]));  // its previous copy is done
    RETURN_IF_ERROR(ParallelFill(fill, r0, r1, row_bytes, buffers_[i]));
    RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(dst + r0 * row_bytes, buffers_[i],
                                         static_cast<size_t>((r1 - r0) * row_bytes),
                                         cudaMemcpyHostToDevice, stream_));
    RETURN_IF_CUDA_ERROR(cudaEventRecord(copied_[i], stream_));
  }
  return OkStatus();
}

Status WeightStager::ParallelFill(const Backend::RowFiller& fill, int64_t r0, int64_t r1,
                                  int64_t row_bytes, void* dst) {
  // Pieces of at least 1 MiB: below that a thread costs more than the copy it takes over.
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 20) / row_bytes);
  const int64_t pieces = std::clamp<int64_t>((r1 - r0) / min_rows, 1, kFillThreads);
  const int64_t per = (r1 - r0 + pieces - 1) / pieces;
  auto piece = [&fill, r0, row_bytes, dst](int64_t a, int64_t b) {
    return fill(a, b, static_cast<uint8_t*>(dst) + (a - r0) * row_bytes);
  };
  std::vector<std::future<Status>> helpers;
  Status st;
  for (int64_t a = r0 + per; a < r1; a += per) {
    const int64_t b = std::min(r1, a + per);
    try {
      helpers.push_back(std::async(std::launch::async, piece, a, b));
    } catch (const std::system_error&) {  // no thread to be had: this one does the piece
      Status s = piece(a, b);
      if (st.ok()) st = std::move(s);
    }
  }
  Status first = piece(r0, std::min(r1, r0 + per));
  if (st.ok()) st = std::move(first);
  for (auto& h : helpers) {
    Status s = h.get();  // every helper is joined before the buffer is touched again
    if (st.ok()) st = std::move(s);
  }
  return st;
}

Status WeightStager::Finish() {
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  return OkStatus();
}

}  // namespace gemma2
