#include "serving/http_client.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cctype>

namespace gemma2::serving {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

Status NetError(const Url& url, const std::string& what, const boost::system::error_code& ec) {
  return Status(StatusCode::kUnavailable,
                url.host + ":" + std::to_string(url.port) + ": " + what + ": " + ec.message());
}

Result<tcp::socket> Connect(asio::io_context& ioc, const Url& url,
                            std::chrono::milliseconds timeout) {
  boost::system::error_code ec;
  tcp::resolver resolver(ioc);
  auto endpoints = resolver.resolve(url.host, std::to_string(url.port), ec);
  if (ec) return NetError(url, "resolve", ec);
  tcp::socket socket(ioc);
  asio::connect(socket, endpoints, ec);
  if (ec) return NetError(url, "connect", ec);
  socket.set_option(tcp::no_delay(true), ec);
  // Blocking reads and writes give up after `timeout` instead of hanging on a silent server.
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return socket;
}

Status Send(tcp::socket& socket, const Url& url, const HttpCall& call) {
  http::request<http::string_body> req{http::string_to_verb(call.method), url.base_path + call.path,
                                       11};
  req.set(http::field::host, url.host + ":" + std::to_string(url.port));
  req.set(http::field::user_agent, "gemma2-client");
  if (!call.body.empty()) req.set(http::field::content_type, "application/json");
  for (const auto& [k, v] : call.headers) req.set(k, v);
  req.keep_alive(false);
  req.body() = call.body;
  req.prepare_payload();
  boost::system::error_code ec;
  http::write(socket, req, ec);
  if (ec) return NetError(url, "send", ec);
  return OkStatus();
}

template <typename Fields>
std::map<std::string, std::string> Headers(const Fields& f) {
  std::map<std::string, std::string> out;
  for (const auto& h : f) {
    std::string name(h.name_string());
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out[name] = std::string(h.value());
  }
  return out;
}

}  // namespace

Result<Url> ParseUrl(const std::string& url) {
  const std::string scheme = "http://";
  if (url.compare(0, scheme.size(), scheme) != 0) {
    return InvalidArgument("--url " + url + ": only http://HOST:PORT URLs are supported");
  }
  Url u;
  std::string rest = url.substr(scheme.size());
  const auto slash = rest.find('/');
  if (slash != std::string::npos) {
    u.base_path = rest.substr(slash);
    rest.resize(slash);
    while (!u.base_path.empty() && u.base_path.back() == '/') u.base_path.pop_back();
  }
  const auto colon = rest.rfind(':');
  u.host = rest.substr(0, colon);
  if (colon != std::string::npos) {
    try {
      u.port = std::stoi(rest.substr(colon + 1));
    } catch (...) {
      return InvalidArgument("--url " + url + ": the port is not a number");
    }
  }
  if (u.host.empty() || u.port <= 0 || u.port > 65535)
    return InvalidArgument("--url " + url + ": no host or port");
  return u;
}

Result<HttpResponse> HttpRequest(const Url& url, const HttpCall& call) {
  asio::io_context ioc;
  ASSIGN_OR_RETURN(tcp::socket socket, Connect(ioc, url, call.timeout));
  RETURN_IF_ERROR(Send(socket, url, call));
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(std::numeric_limits<uint64_t>::max());
  boost::system::error_code ec;
  http::read(socket, buffer, parser, ec);
  if (ec) return NetError(url, "read", ec);
  HttpResponse r;
  r.status = static_cast<int>(parser.get().result_int());
  r.headers = Headers(parser.get());
  r.body = std::move(parser.get().body());
  return r;
}

Result<HttpResponse> HttpStream(const Url& url, const HttpCall& call,
                                const std::function<bool(std::string_view data)>& on_event) {
  asio::io_context ioc;
  ASSIGN_OR_RETURN(tcp::socket socket, Connect(ioc, url, call.timeout));
  RETURN_IF_ERROR(Send(socket, url, call));
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(std::numeric_limits<uint64_t>::max());
  boost::system::error_code ec;
  http::read_header(socket, buffer, parser, ec);
  if (ec) return NetError(url, "read", ec);
  HttpResponse r;
  r.status = static_cast<int>(parser.get().result_int());
  r.headers = Headers(parser.get());
  const bool events =
      r.status == 200 && r.headers["content-type"].rfind("text/event-stream", 0) == 0;
  std::string pending;  // bytes of an event not yet complete
  char chunk[16384];
  while (!parser.is_done()) {
    parser.get().body().data = chunk;
    parser.get().body().size = sizeof(chunk);
    http::read_some(socket, buffer, parser, ec);  // whatever arrived: events as they come
    if (ec == http::error::need_buffer) ec = {};
    if (ec) return NetError(url, "read", ec);
    const size_t got = sizeof(chunk) - parser.get().body().size;
    if (!events) {
      r.body.append(chunk, got);
      continue;
    }
    pending.append(chunk, got);
    size_t end;
    while ((end = pending.find("\n\n")) != std::string::npos) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      // An event is lines; its data is the "data:" lines joined by newlines.
      std::string data;
      size_t pos = 0;
      bool any = false;
      while (pos <= event.size()) {
        size_t nl = event.find('\n', pos);
        if (nl == std::string::npos) nl = event.size();
        std::string_view line(event.data() + pos, nl - pos);
        if (line.substr(0, 5) == "data:") {
          line.remove_prefix(line.size() > 5 && line[5] == ' ' ? 6 : 5);
          if (any) data += '\n';
          data.append(line);
          any = true;
        }
        pos = nl + 1;
      }
      if (any && !on_event(data)) {
        boost::system::error_code ignored;
        socket.shutdown(tcp::socket::shutdown_both, ignored);
        socket.close(ignored);
        return r;
      }
    }
  }
  return r;
}

}  // namespace gemma2::serving
