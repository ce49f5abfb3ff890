// GPU smoke test (label gpu): the device is usable, the check macro reports failures, and the
// device's bf16 rounding is the host's (common/dtype.h), which the CUDA engine relies on.
// Skips with one line where no GPU is present.
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <vector>

#include "common/cuda_check.h"
#include "common/dtype.h"

namespace gemma2 {
namespace {

__global__ void RoundToBf16(const float* in, uint16_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "skipped: no CUDA device";
  }
};

Status RoundOnDevice(const std::vector<float>& in, std::vector<uint16_t>* out) {
  float* d_in = nullptr;
  uint16_t* d_out = nullptr;
  const int n = static_cast<int>(in.size());
  RETURN_IF_CUDA_ERROR(cudaMalloc(&d_in, n * sizeof(float)));
  RETURN_IF_CUDA_ERROR(cudaMalloc(&d_out, n * sizeof(uint16_t)));
  RETURN_IF_CUDA_ERROR(cudaMemcpy(d_in, in.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  RoundToBf16<<<(n + 255) / 256, 256>>>(d_in, d_out, n);
  RETURN_IF_CUDA_ERROR(cudaGetLastError());
  out->resize(in.size());
  RETURN_IF_CUDA_ERROR(
      cudaMemcpy(out->data(), d_out, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  RETURN_IF_CUDA_ERROR(cudaFree(d_in));
  RETURN_IF_CUDA_ERROR(cudaFree(d_out));
  return OkStatus();
}

TEST_F(GpuTest, DeviceBf16RoundingEqualsHost) {
  std::vector<float> in;
  for (uint32_t bits = 0x3f000000; bits < 0x3f000000 + (1u << 20); bits += 7) {
    float f;
    std::memcpy(&f, &bits, 4);
    in.push_back(f);
    in.push_back(-f * 1e3f);
  }
  in.push_back(67.882251f);  // sqrt(4608) -> 68.0
  std::vector<uint16_t> out;
  const Status st = RoundOnDevice(in, &out);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(out[i], F32ToBf16(in[i])) << in[i];
  EXPECT_EQ(Bf16ToF32(out.back()), 68.0f);
}

TEST_F(GpuTest, CheckMacroNamesTheFailure) {
  auto fail = []() -> Status {
    RETURN_IF_CUDA_ERROR(cudaSetDevice(1 << 20));
    return OkStatus();
  };
  const Status st = fail();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("cudaErrorInvalidDevice"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("cudaSetDevice(1 << 20)"), std::string::npos);
  EXPECT_NE(st.message().find("host "), std::string::npos);
}

}  // namespace
}  // namespace gemma2
