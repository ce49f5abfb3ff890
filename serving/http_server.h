// The coordinator's public face: an HTTP/1.1 server (Boost.Beast, C++20 coroutines on one I/O
// thread) with OpenAI's routes. Requests go to the Scheduler; streams are server-sent events.
//
//   GET  /health                 the process is up (no key needed)
//   GET  /ready                  200 once SetReady(true) and no rank lost, else 503 (no key needed)
//   GET  /metrics                Prometheus text
//   GET  /v1/models
//   POST /v1/completions, /v1/chat/completions, /v1/classify
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
};

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
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gemma2::serving
