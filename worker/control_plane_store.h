// The collectives' rendezvous over the worker's control channel: a Gloo store whose keys live in
// the coordinator (served during startup). Ranks on different hosts meet without a shared file
// system or another port. Failures throw (Gloo's contract); GlooCollective::Create turns them
// into a Status naming the rank.
#pragma once

#include <gloo/rendezvous/store.h>

#include <chrono>

#include "rpc/ucx_channel.h"

namespace gemma2 {

class ControlPlaneStore final : public gloo::rendezvous::Store {
 public:
  ControlPlaneStore(rpc::Channel& ch, std::chrono::milliseconds timeout)
      : ch_(ch), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override;
  // Blocks until the key is set (by any rank) or the timeout passes.
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  std::vector<char> Get(const std::string& key, std::chrono::milliseconds timeout);
  rpc::Channel& ch_;
  std::chrono::milliseconds timeout_;
};

}  // namespace gemma2
