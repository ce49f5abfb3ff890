#include "rpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <vector>

namespace gemma2::rpc {

Result<Nonce> FreshNonce() {
  Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    return Internal("no random bytes for a control-plane nonce");
  }
  return n;
}

Mac AuthMac(std::span<const uint8_t> secret, const Nonce& nonce, uint32_t rank,
            std::span<const uint8_t> bound) {
  std::vector<uint8_t> msg(nonce.begin(), nonce.end());
  for (int i = 0; i < 4; ++i) msg.push_back(static_cast<uint8_t>(rank >> (8 * i)));
  msg.insert(msg.end(), bound.begin(), bound.end());
  Mac mac{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), msg.data(), msg.size(),
       mac.data(), &len);
  return mac;
}

bool VerifyAuth(std::span<const uint8_t> secret, const Nonce& nonce, uint32_t rank,
                std::span<const uint8_t> received, std::span<const uint8_t> bound) {
  if (received.size() != sizeof(Mac)) return false;
  const Mac expected = AuthMac(secret, nonce, rank, bound);
  return CRYPTO_memcmp(expected.data(), received.data(), expected.size()) == 0;
}

}  // namespace gemma2::rpc
