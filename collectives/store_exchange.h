// An all-gather of small byte strings through a rendezvous store (the workers' control-plane
// store, or a file store in tests): how a group's ranks trade setup data such as memory handles.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace gloo::rendezvous {
class Store;
}

namespace gemma2 {

// Publishes `mine` under key/rank and returns every rank's value under key/0 .. key/size-1, in
// rank order; waits as long as the store's own timeout. kUnavailable when the store gives up.
Result<std::vector<std::string>> ExchangeThroughStore(gloo::rendezvous::Store& store,
                                                      const std::string& key, int rank, int size,
                                                      const std::string& mine);

}  // namespace gemma2
