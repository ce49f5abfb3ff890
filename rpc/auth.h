// Proving knowledge of the cluster secret: the verifier sends a fresh random nonce, the prover
// answers HMAC-SHA256(secret, nonce || rank || bound), where `bound` is what the answer vouches
// for (the prover's UCX worker address); the verifier compares in constant time. The secret itself
// never crosses the wire; a replayed answer fails against the next nonce.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "common/status.h"

namespace gemma2::rpc {

using Nonce = std::array<uint8_t, 32>;
using Mac = std::array<uint8_t, 32>;

// 32 bytes from the operating system's random source.
Result<Nonce> FreshNonce();
Mac AuthMac(std::span<const uint8_t> secret, const Nonce& nonce, uint32_t rank,
            std::span<const uint8_t> bound = {});
// Constant-time comparison of the expected MAC with the one received.
bool VerifyAuth(std::span<const uint8_t> secret, const Nonce& nonce, uint32_t rank,
                std::span<const uint8_t> received, std::span<const uint8_t> bound = {});

}  // namespace gemma2::rpc
