// libFuzzer target: any bytes as a whole safetensors file. The parser must return a Status,
// never crash, hang or read past the buffer (ASan/UBSan watch).
#include <cstddef>
#include <cstdint>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto n = static_cast<int64_t>(size);
  auto r = gemma2::ParseSafetensorsHeader(data, n, n, "fuzz");
  if (r.ok()) {
    for (const auto& [name, t] : r->tensors) {
      // Every accepted range lies inside the buffer: touch its first and last byte.
      if (t.end > t.begin) {
        volatile uint8_t a = data[r->data_offset + t.begin];
        volatile uint8_t b = data[r->data_offset + t.end - 1];
        (void)a;
        (void)b;
      }
    }
  }
  return 0;
}
