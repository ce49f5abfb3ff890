#include "worker/control_plane_store.h"

#include <stdexcept>

#include "rpc/wire.h"

namespace gemma2 {

void ControlPlaneStore::set(const std::string& key, const std::vector<char>& data) {
  rpc::Writer w;
  w.Str(key);
  w.Bytes({reinterpret_cast<const uint8_t*>(data.data()), data.size()});
  const Status st = ch_.Send(rpc::MessageType::kStoreSet, w.out(), timeout_);
  if (!st.ok()) throw std::runtime_error("rendezvous set '" + key + "': " + st.message());
}

std::vector<char> ControlPlaneStore::Get(const std::string& key,
                                         std::chrono::milliseconds timeout) {
  rpc::Writer w;
  w.Str(key);
  Status st = ch_.Send(rpc::MessageType::kStoreGet, w.out(), timeout_);
  if (!st.ok()) throw std::runtime_error("rendezvous get '" + key + "': " + st.message());
  auto m = ch_.Receive(timeout);
  if (!m.ok()) throw std::runtime_error("rendezvous get '" + key + "': " + m.status().message());
  if (m->type != rpc::MessageType::kStoreValue) {
    throw std::runtime_error("rendezvous get '" + key + "': unexpected message type " +
                             std::to_string(static_cast<int>(m->type)));
  }
  rpc::Reader r(m->payload);
  std::string got;
  std::vector<uint8_t> value;
  st = r.Str(&got, rpc::kMaxStoreKey);
  if (st.ok()) st = r.Bytes(&value, rpc::kMaxPayload);
  if (st.ok()) st = r.Done();
  if (!st.ok() || got != key)
    throw std::runtime_error("rendezvous get '" + key + "': malformed answer");
  return {value.begin(), value.end()};
}

std::vector<char> ControlPlaneStore::get(const std::string& key) { return Get(key, timeout_); }

void ControlPlaneStore::wait(const std::vector<std::string>& keys,
                             const std::chrono::milliseconds& timeout) {
  for (const auto& k : keys) (void)Get(k, timeout);
}

}  // namespace gemma2
