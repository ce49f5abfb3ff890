// libFuzzer target: any bytes as a control-plane frame. Parsing must return a Status, never
// crash, hang, read out of bounds or allocate what the payload cannot back.
#include <cstddef>
#include <cstdint>

#include "rpc/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  auto header = gemma2::rpc::ParseHeader(in);
  const auto payload = size >= gemma2::rpc::kHeaderBytes ? in.subspan(gemma2::rpc::kHeaderBytes)
                                                         : std::span<const uint8_t>();
  if (header.ok() && header->type == gemma2::rpc::MessageType::kError) {
    gemma2::Status st;
    (void)gemma2::rpc::DecodeStatus(payload, &st);
  } else if (header.ok() && header->type == gemma2::rpc::MessageType::kHeartbeat) {
    (void)gemma2::rpc::DecodeKvCapacity(payload);
  } else if (header.ok() && header->type == gemma2::rpc::MessageType::kStepResult) {
    (void)gemma2::rpc::DecodeStepOutput(payload);  // what a worker answers the coordinator
  } else {
    (void)gemma2::rpc::DecodeStep(payload);
  }
  return 0;
}
