// The random numbers of sampling, identical on host and device: a Gumbel(0, 1) variate for token
// `index` of draw `counter` of a request seeded with `seed`. Counter-based (no state), so a
// replayed or re-sharded step draws the same numbers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GEMMA2_HOST_DEVICE __host__ __device__
#else
#define GEMMA2_HOST_DEVICE
#endif

namespace gemma2 {

GEMMA2_HOST_DEVICE inline uint64_t SampleHash(uint64_t seed, uint64_t counter, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull ^ (counter + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^
               (index + 1) * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// -log(-log(u)) with u uniform in (0, 1) on a 2^-24 grid (exact in fp32).
GEMMA2_HOST_DEVICE inline float GumbelNoise(uint64_t seed, uint64_t counter, uint64_t index) {
  const float u = (static_cast<float>(SampleHash(seed, counter, index) >> 40) + 0.5f) * 5.9604645e-8f;
  return -logf(-logf(u));
}

// Monotone map of floats to unsigned keys (a larger float has a larger key) and back.
GEMMA2_HOST_DEVICE inline uint32_t FloatKey(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
GEMMA2_HOST_DEVICE inline float KeyFloat(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// The largest key k for which enough(k) holds, given enough(0) holds and enough is monotone
// (true up to some key, false after). 32 probes; the arithmetic is 64-bit so the full range
// cannot wrap.
template <typename Enough>
GEMMA2_HOST_DEVICE uint32_t LargestKey(Enough enough) {
  uint64_t lo = 0, hi = 0xffffffffull;
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo + 1) / 2;
    if (enough(static_cast<uint32_t>(mid))) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return static_cast<uint32_t>(lo);
}

}  // namespace gemma2
