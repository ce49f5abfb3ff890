// The coordinator's public face: an HTTP/1.1 server (Boost.Beast, C++20 coroutines on one I/O
// thread) with OpenAI's routes. Requests go to the Scheduler; streams are server-sent events.
//
//   GET  /health                 the process is up (no key needed)
//   GET  /ready                  200 once SetReady(true) and no rank lost, else 503 (no key needed)
//   GET  /version                version and git commit (no key needed)
//   GET  /metrics                Prometheus text (no key with ServerOptions::metrics_open)
//   GET  /v1/models, /v1/models/{id}
//   POST /v1/completions, /v1/chat/completions, /v1/classify (also /classify)
//   POST /tokenize, /detokenize  vLLM's shapes
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "common/status.h"
#include "serving/metrics.h"
#include "serving/request_parser.h"
#include "serving/scheduler.h"

namespace gemma2::serving {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                         // 0: any free port (see HttpServer::port)
  std::string api_key;                     // empty: no key required
  std::chrono::seconds idle_timeout{120};  // a connection that sends nothing this long is closed
  // A client that stops reading (a response or a stream's next chunk not taken) is cut after
  // this long.
  std::chrono::seconds write_timeout{30};
  // Open connections at most. Past it the connection idle longest (waiting for a request) is
  // closed to make room, or, when every one is busy with a request, the new one is answered 503
  // and closed at once. 0: the process's descriptor limit less a reserve (DefaultMaxConnections).
  int max_connections = 0;
  bool metrics_open = false;  // /metrics without the API key (for a Prometheus scraper)
};

// The soft RLIMIT_NOFILE less 128 descriptors for everything else (at least 16).
int DefaultMaxConnections();

class HttpServer {
 public:
  HttpServer(Scheduler& scheduler, Metrics& metrics, ModelFacts facts, ServerOptions opts);
  ~HttpServer();  // Stop()
  // Binds and starts serving on a thread of its own.
  Status Start();
  int port() const;
  void SetReady(bool ready);
  // Closes the listening socket (draining); open connections keep being served.
  void StopAccepting();
  // Waits until no connection is between a request and the end of writing its response (a
  // drain's last answers have left their sockets), or until `deadline`; true when none is.
  bool WaitForResponses(std::chrono::steady_clock::time_point deadline) const;
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gemma2::serving
