#include "collectives/store_exchange.h"

#include <gloo/rendezvous/store.h>

#include <exception>

namespace gemma2 {

Result<std::vector<std::string>> ExchangeThroughStore(gloo::rendezvous::Store& store,
                                                      const std::string& key, int rank, int size,
                                                      const std::string& mine) {
  try {
    store.set(key + "/" + std::to_string(rank), std::vector<char>(mine.begin(), mine.end()));
    std::vector<std::string> all;
    for (int k = 0; k < size; ++k) {
      const std::vector<char> v = store.get(key + "/" + std::to_string(k));
      all.emplace_back(v.begin(), v.end());
    }
    return all;
  } catch (const std::exception& e) {
    return Status(StatusCode::kUnavailable, "rendezvous '" + key + "': " + e.what());
  }
}

}  // namespace gemma2
