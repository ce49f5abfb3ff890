// A small blocking HTTP/1.1 client (Boost.Beast) for gemma2-client and the tests: plain requests,
// and server-sent-event streams delivered one `data:` payload at a time. One connection per call.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "common/status.h"

namespace gemma2::serving {

struct Url {
  std::string host;
  int port = 80;
  std::string base_path;  // e.g. "" or "/v1" prefix the caller's paths are appended to
};
// "http://host:port[/prefix]" (https is not supported).
Result<Url> ParseUrl(const std::string& url);

struct HttpResponse {
  int status = 0;
  std::string body;                            // for streams: empty
  std::map<std::string, std::string> headers;  // names lower-case
};

struct HttpCall {
  std::string method = "POST";
  std::string path;
  std::string body;
  std::map<std::string, std::string> headers;
  std::chrono::milliseconds timeout{600000};  // any single read or write
};

Result<HttpResponse> HttpRequest(const Url& url, const HttpCall& call);

// For a 200 text/event-stream answer, calls on_event with each event's data ("[DONE]" included);
// returning false from on_event closes the connection at once (a client that walks away).
// Any other status is returned with its body read whole.
Result<HttpResponse> HttpStream(const Url& url, const HttpCall& call,
                                const std::function<bool(std::string_view data)>& on_event);

}  // namespace gemma2::serving
