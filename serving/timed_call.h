// One request to an OpenAI-compatible server as a client sees it (gemma2-client,
// gemma2-serve-bench): the answer, a streamed one folded back into the unstreamed shape, with the
// client-side times benchmarks report: time to the first token and the gaps between later ones.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serving/http_client.h"

namespace gemma2::serving {

struct TimedAnswer {
  Result<HttpResponse> http = HttpResponse{};  // the status and headers (a connection error)
  nlohmann::json response;  // the body (parsed when JSON), or the folded stream
  bool ok = false;          // 200 and no error event in the stream
  double latency_s = 0;     // request sent to answer complete
  double ttft_s = -1;       // streamed: to the first chunk with choices (-1: none came)
  std::vector<double> itl_s;  // streamed: between chunks with choices (vLLM's ITL)
  int64_t completion_tokens = 0;  // the answer's usage (0 without one)
  // Streamed with usage in every chunk (vLLM's continuous_usage_stats): the chunks that carried
  // tokens, and those that carried more than one (tokens the server sent together).
  int64_t token_chunks = 0, multi_token_chunks = 0;
};

// Sends `call`; `stream`: the body asks for server-sent events; `chat`: chunks carry deltas.
TimedAnswer CallTimed(const Url& url, const HttpCall& call, bool stream, bool chat);

// The p-th percentile (0-100) by nearest rank; 0 for no values.
double Percentile(std::vector<double> v, double p);

}  // namespace gemma2::serving
