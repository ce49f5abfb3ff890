#include "serving/timed_call.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <string_view>

#include "common/json_depth.h"

namespace gemma2::serving {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

// A server's JSON: parsed with its nesting bounded (common/json_depth.h); discarded when it is
// not JSON or nests too deep.
json ParsePeer(std::string_view text) {
  if (!JsonNestingWithin(text, kMaxPeerJsonDepth)) return json(json::value_t::discarded);
  return json::parse(text, nullptr, false);
}

// Choices a streamed answer may name (an index past it is the server's error, not an allocation).
constexpr size_t kMaxChoices = 4096;

// A streamed answer folded back into the shape of the non-streamed one. Throws json::exception
// on a chunk of another shape (the caller reports it).
void Fold(json& acc, const json& chunk, bool chat) {
  if (chunk.contains("usage") && !chunk["usage"].is_null()) acc["usage"] = chunk["usage"];
  for (const auto& c : chunk.value("choices", json::array())) {
    const size_t i = c.value("index", size_t{0});
    if (i >= kMaxChoices)
      throw json::other_error::create(501, "choice index " + std::to_string(i), &c);
    auto& choices = acc["choices"];
    while (choices.size() <= i) {
      choices.push_back(chat ? json{{"index", choices.size()},
                                    {"message", {{"role", "assistant"}, {"content", ""}}}}
                             : json{{"index", choices.size()}, {"text", ""}});
    }
    auto& dst = choices[i];
    if (chat) {
      if (c.contains("delta") && c["delta"].contains("content")) {
        dst["message"]["content"] =
            dst["message"]["content"].get<std::string>() + c["delta"]["content"].get<std::string>();
      }
    } else {
      dst["text"] = dst["text"].get<std::string>() + c.value("text", "");
    }
    if (!c["finish_reason"].is_null()) dst["finish_reason"] = c["finish_reason"];
  }
}

}  // namespace

TimedAnswer CallTimed(const Url& url, const HttpCall& call, bool stream, bool chat) {
  TimedAnswer o;
  const auto start = Clock::now();
  json acc = {{"choices", json::array()}};
  Clock::time_point last{};
  bool stream_error = false;
  int64_t streamed_tokens = 0;  // the last chunk's usage.completion_tokens
  o.http = stream ? HttpStream(url, call,
                               [&](std::string_view data) {
                                 if (data == "[DONE]") return true;
                                 json chunk = ParsePeer(data);
                                 if (chunk.is_discarded() || !chunk.is_object()) return true;
                                 if (chunk.contains("error")) {
                                   acc = chunk;
                                   stream_error = true;
                                   return true;
                                 }
                                 // Every chunk with choices is a token arrival (as vLLM's
                                 // serving benchmark counts): its text may be empty (bytes
                                 // held back, a model without a tokenizer).
                                 const auto now = Clock::now();
                                 const json* choices = chunk.contains("choices")
                                                           ? &chunk["choices"]
                                                           : nullptr;
                                 if (choices && choices->is_array() && !choices->empty() &&
                                     chunk.contains("usage") && chunk["usage"].is_object() &&
                                     chunk["usage"].contains("completion_tokens") &&
                                     chunk["usage"]["completion_tokens"].is_number_integer()) {
                                   const int64_t n =
                                       chunk["usage"]["completion_tokens"].get<int64_t>();
                                   if (n > streamed_tokens) {
                                     ++o.token_chunks;
                                     if (n - streamed_tokens > 1) ++o.multi_token_chunks;
                                     streamed_tokens = n;
                                   }
                                 }
                                 if (choices && choices->is_array() && !choices->empty()) {
                                   if (o.ttft_s < 0)
                                     o.ttft_s = std::chrono::duration<double>(now - start).count();
                                   else
                                     o.itl_s.push_back(
                                         std::chrono::duration<double>(now - last).count());
                                   last = now;
                                 }
                                 if (!acc.contains("id") && chunk.contains("id")) acc["id"] = chunk["id"];
                                 try {
                                   Fold(acc, chunk, chat);
                                 } catch (const json::exception& e) {  // a chunk of another shape
                                   acc = {{"error",
                                           {{"message", std::string("a malformed chunk from the "
                                                                    "server: ") +
                                                            e.what()}}}};
                                   stream_error = true;
                                   return false;
                                 }
                                 return true;
                               })
                  : HttpRequest(url, call);
  o.latency_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (!o.http.ok()) return o;
  const int status = o.http->status;
  o.response = stream && status == 200 ? acc : ParsePeer(o.http->body);
  if (o.response.is_discarded()) o.response = o.http->body;
  o.ok = status == 200 && !stream_error;
  if (o.ok && o.response.is_object() && o.response.contains("usage") &&
      o.response["usage"].is_object() && o.response["usage"].contains("completion_tokens") &&
      o.response["usage"]["completion_tokens"].is_number_integer())
    o.completion_tokens = o.response["usage"]["completion_tokens"].get<int64_t>();
  return o;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i =
      std::min(v.size() - 1,
               static_cast<size_t>(std::ceil(p / 100 * static_cast<double>(v.size()))) - (p > 0));
  return v[i];
}

}  // namespace gemma2::serving
