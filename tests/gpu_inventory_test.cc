// Counting a node's GPUs without CUDA: CUDA_VISIBLE_DEVICES as CUDA reads it, /dev/nvidiaN files
// otherwise, and the launch-time check of ranks against GPUs.
#include "common/gpu_inventory.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include "tests/test_files.h"

namespace gemma2 {
namespace {

TEST(GpuInventoryTest, CudaVisibleDevicesCountsUpToTheFirstInvalidEntry) {
  EXPECT_EQ(CountVisibleDevices(""), 0);
  EXPECT_EQ(CountVisibleDevices("0"), 1);
  EXPECT_EQ(CountVisibleDevices("0,1,2,3"), 4);
  EXPECT_EQ(CountVisibleDevices(" 2 , 3"), 2);
  EXPECT_EQ(CountVisibleDevices("0,1,-1,2"), 2);
  EXPECT_EQ(CountVisibleDevices("-1"), 0);
  EXPECT_EQ(CountVisibleDevices("GPU-8f2e,MIG-11aa"), 2);
  EXPECT_EQ(CountVisibleDevices("0,x,1"), 1);
}

TEST(GpuInventoryTest, DeviceFilesCountWhenNothingIsSet) {
  testing::TempDir dir;
  for (const char* name : {"nvidia0", "nvidia1", "nvidia7", "nvidiactl", "nvidia-uvm", "null"})
    std::ofstream(dir.path() / name) << "";
  const char* saved = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string keep = saved ? saved : "";
  unsetenv("CUDA_VISIBLE_DEVICES");
  EXPECT_EQ(VisibleGpuCount(dir.path().string()), 3);
  EXPECT_EQ(VisibleGpuCount((dir.path() / "missing").string()), 0);
  setenv("CUDA_VISIBLE_DEVICES", "1", 1);
  EXPECT_EQ(VisibleGpuCount(dir.path().string()), 1);  // the variable wins
  if (saved) {
    setenv("CUDA_VISIBLE_DEVICES", keep.c_str(), 1);
  } else {
    unsetenv("CUDA_VISIBLE_DEVICES");
  }
}

TEST(GpuInventoryTest, RanksMustFitTheNodesGpus) {
  auto ok = GpusForNode(0, 4, 8);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 8);
  auto short_node = GpusForNode(1, 4, 2);
  ASSERT_FALSE(short_node.ok());
  EXPECT_EQ(short_node.status().message(),
            "node 1 runs 4 GPU ranks but has 2 GPUs (--gpus-per-node)");
  // Detection that finds nothing refuses nothing (the ranks' own CUDA errors say more).
  const char* saved = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string keep = saved ? saved : "";
  setenv("CUDA_VISIBLE_DEVICES", "", 1);
  auto unknown = GpusForNode(0, 4, 0);
  ASSERT_TRUE(unknown.ok()) << unknown.status().message();
  EXPECT_EQ(*unknown, 0);
  setenv("CUDA_VISIBLE_DEVICES", "0,1", 1);
  auto detected = GpusForNode(0, 4, 0);
  ASSERT_FALSE(detected.ok());
  EXPECT_NE(detected.status().message().find("has 2 GPUs (detected;"), std::string::npos)
      << detected.status().message();
  if (saved) {
    setenv("CUDA_VISIBLE_DEVICES", keep.c_str(), 1);
  } else {
    unsetenv("CUDA_VISIBLE_DEVICES");
  }
}

}  // namespace
}  // namespace gemma2
