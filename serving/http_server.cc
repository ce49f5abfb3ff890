#include "serving/http_server.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <list>
#include <random>
#include <thread>

#include "common/log.h"
#include "common/version.h"
#include "serving/responses.h"
#include "serving/session_waker.h"

namespace gemma2::serving {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::awaitable;
using asio::use_awaitable;
using tcp = asio::ip::tcp;
using nlohmann::json;
using Request = http::request<http::string_body>;

constexpr auto kPoll =
    std::chrono::milliseconds(50);  // how often a waiting session checks its client

std::string NewRequestId() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(rng()));
  return buf;
}

// A usable client-supplied X-Request-Id: short and printable.
bool UsableId(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  return std::all_of(id.begin(), id.end(), [](char c) { return c > 32 && c < 127; });
}

// True when the peer closed the connection (peeks; never consumes a pipelined request).
bool ClientGone(tcp::socket& s) {
  char c;
  const ssize_t n = ::recv(s.native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return true;
  return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

bool SameKey(const std::string& given, const std::string& expected) {
  unsigned char a[SHA256_DIGEST_LENGTH], b[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(given.data()), given.size(), a);
  SHA256(reinterpret_cast<const unsigned char*>(expected.data()), expected.size(), b);
  return CRYPTO_memcmp(a, b, sizeof(a)) == 0;  // constant time in the key's contents
}

// "Bearer" is a case-insensitive scheme name (RFC 7235); the key after it is exact.
std::optional<std::string> BearerToken(std::string_view auth) {
  constexpr std::string_view kScheme = "bearer ";
  if (auth.size() < kScheme.size() || !beast::iequals(beast::string_view(auth.data(), kScheme.size()),
                                                      beast::string_view(kScheme.data(), kScheme.size())))
    return std::nullopt;
  return std::string(auth.substr(kScheme.size()));
}

}  // namespace

int DefaultMaxConnections() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) != 0 || r.rlim_cur == RLIM_INFINITY) return 65536;
  return static_cast<int>(std::max<rlim_t>(16, r.rlim_cur > 144 ? r.rlim_cur - 128 : 16));
}

class HttpServer::Impl {
 public:
  Impl(Scheduler& s, Metrics& m, ModelFacts f, ServerOptions o)
      : scheduler_(s), metrics_(m), facts_(std::move(f)), opts_(std::move(o)), acceptor_(ioc_) {
    if (opts_.max_connections <= 0) opts_.max_connections = DefaultMaxConnections();
    if (!facts_.constraints && facts_.tokenizer) {
      const auto& eos = facts_.config->eos_token_ids;
      facts_.constraints = std::make_shared<ConstraintCache>(
          *facts_.tokenizer, std::vector<int32_t>(eos.begin(), eos.end()));
    }
  }

  Status Start() {
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(opts_.host, ec);
    if (ec) return InvalidArgument("--host " + opts_.host + ": " + ec.message());
    tcp::endpoint ep(addr, static_cast<uint16_t>(opts_.port));
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (!ec) fcntl(acceptor_.native_handle(), F_SETFD, FD_CLOEXEC);  // no child inherits it
    if (ec) {
      return Status(StatusCode::kUnavailable, "cannot listen on " + opts_.host + ":" +
                                                  std::to_string(opts_.port) + ": " + ec.message());
    }
    port_ = acceptor_.local_endpoint().port();
    asio::co_spawn(ioc_, Accept(), asio::detached);
    thread_ = std::thread([this] { ioc_.run(); });
    return OkStatus();
  }
  void StopAccepting() {
    asio::post(ioc_, [this] {
      boost::system::error_code ec;
      acceptor_.close(ec);
    });
  }
  void Stop() {
    ioc_.stop();
    if (thread_.joinable()) thread_.join();
    parse_pool_.join();  // no parse still reads a request a coroutine frame owns
  }
  int port() const { return port_; }
  bool WaitForResponses(std::chrono::steady_clock::time_point deadline) const {
    while (answering_.load() > 0) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }
  std::atomic<bool> ready{false};

 private:
  awaitable<void> Accept() {
    asio::steady_timer backoff(ioc_);
    while (acceptor_.is_open()) {
      boost::system::error_code ec;
      tcp::socket socket = co_await acceptor_.async_accept(asio::redirect_error(use_awaitable, ec));
      if (ec) {
        if (ec == asio::error::operation_aborted) co_return;
        // Out of descriptors (or another transient failure): the pending connection stays in the
        // backlog, so retrying at once would spin. Serve the connections we have for a while.
        if (ec == asio::error::no_descriptors || ec.value() == ENFILE ||
            ec == asio::error::no_buffer_space || ec == asio::error::no_memory) {
          backoff.expires_after(std::chrono::milliseconds(50));
          co_await backoff.async_wait(asio::redirect_error(use_awaitable, ec));
        }
        continue;
      }
      if (sessions_ >= opts_.max_connections && !EvictIdle()) {
        RefuseAtCapacity(socket);
        continue;
      }
      socket.set_option(tcp::no_delay(true), ec);  // stream chunks leave at once (no Nagle delay)
      asio::co_spawn(ioc_, Session(beast::tcp_stream(std::move(socket))), asio::detached);
    }
  }

  // Past --max-connections: a 503 written without waiting (a fresh socket's buffer takes it), then
  // the connection closes. Costs the I/O thread no wait and the process no lasting descriptor.
  void RefuseAtCapacity(tcp::socket& socket) {
    metrics_.refused_connections.fetch_add(1);
    const std::string body = ErrorBody(ApiError{503,
                                                "the server is at its limit of " +
                                                    std::to_string(opts_.max_connections) +
                                                    " open connections; retry later",
                                                "server_error", "", "too_many_connections"})
                                 .dump();
    const std::string res = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            "Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    boost::system::error_code ec;
    socket.non_blocking(true, ec);
    socket.write_some(asio::buffer(res), ec);
    socket.shutdown(tcp::socket::shutdown_both, ec);
    socket.close(ec);
  }

  // At the cap, a connection waiting for its next request (keep-alive, or one that never sent
  // one) gives way to the new one, longest waiting first, as HTTP lets a server close an idle
  // connection at any time. False when every connection is busy with a request.
  bool EvictIdle() {
    if (idle_.empty()) return false;
    IdleMark* oldest = idle_.front();
    idle_.pop_front();
    oldest->listed = false;
    boost::system::error_code ec;
    oldest->stream->socket().shutdown(tcp::socket::shutdown_both, ec);
    oldest->stream->socket().close(ec);  // its pending read ends with operation_aborted
    metrics_.evicted_connections.fetch_add(1);
    return true;
  }

  // A session while it waits for a request header (I/O thread only).
  struct IdleMark {
    beast::tcp_stream* stream;
    std::list<IdleMark*>::iterator pos;
    bool listed = false;
  };

  // Counts the open sessions (the I/O thread's only: no lock).
  struct SessionCount {
    int& n;
    explicit SessionCount(int& count) : n(count) { ++n; }
    ~SessionCount() { --n; }
  };
  // Counts the sessions between a request's header and the end of its response (read by
  // WaitForResponses on another thread).
  struct Answering {
    std::atomic<int>& n;
    explicit Answering(std::atomic<int>& count) : n(count) { n.fetch_add(1); }
    ~Answering() { n.fetch_sub(1); }
  };

  awaitable<void> Session(beast::tcp_stream stream) {
    const SessionCount counted(sessions_);
    beast::flat_buffer buffer;
    while (true) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(facts_.limits.max_body_bytes);
      parser.header_limit(64 * 1024);
      stream.expires_after(opts_.idle_timeout);
      boost::system::error_code ec;
      IdleMark mark{&stream};
      mark.pos = idle_.insert(idle_.end(), &mark);
      mark.listed = true;
      co_await http::async_read_header(stream, buffer, parser,
                                       asio::redirect_error(use_awaitable, ec));
      if (mark.listed) idle_.erase(mark.pos);
      const Answering answering(answering_);
      // A client that asks before sending a large body (curl does past 1 MB) is told to go on,
      // instead of waiting out its own timeout; one whose announced body is too large hears so now.
      if (!ec && beast::iequals(parser.get()[http::field::expect], "100-continue") &&
          !(parser.content_length() && *parser.content_length() > facts_.limits.max_body_bytes)) {
        http::response<http::empty_body> go_on{http::status::continue_, 11};
        co_await http::async_write(stream, go_on, asio::redirect_error(use_awaitable, ec));
      }
      if (!ec && !parser.is_done()) {
        co_await http::async_read(stream, buffer, parser, asio::redirect_error(use_awaitable, ec));
      }
      if (ec == http::error::body_limit) {
        metrics_.received.fetch_add(1);
        metrics_.End(Outcome::kRejected);
        const ApiError e{413, "the body is larger than the limit of " +
                                  std::to_string(facts_.limits.max_body_bytes) + " bytes"};
        co_await Send(stream, ErrorResponse(e, NewRequestId(), false));
        break;
      }
      if (ec) {
        if (ec != http::error::end_of_stream && ec != beast::error::timeout &&
            ec != asio::error::eof && ec != asio::error::connection_reset &&
            ec != asio::error::operation_aborted) {
          const ApiError e{400, "malformed HTTP request: " + ec.message()};
          co_await Send(stream, ErrorResponse(e, NewRequestId(), false));
        }
        break;
      }
      stream.expires_never();
      Request req = parser.release();
      bool keep = false;
      std::optional<ApiError> bug;
      try {
        keep = co_await Handle(stream, req);
      } catch (const std::exception& e) {  // a bug must cost one request, not the server
        bug = ApiError{500, std::string("internal error: ") + e.what(), "server_error"};
      }
      if (bug) {
        co_await Send(stream, ErrorResponse(*bug, NewRequestId(), false));
        break;
      }
      if (!keep || !req.keep_alive()) break;
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
  }

  using Response = http::response<http::string_body>;

  static Response JsonResponse(http::status status, const json& body, const std::string& rid,
                               bool keep) {
    Response res{status, 11};
    res.set(http::field::content_type, "application/json");
    if (!rid.empty()) res.set("X-Request-Id", rid);
    res.keep_alive(keep);
    res.body() = body.dump(-1, ' ', false, json::error_handler_t::replace);
    return res;
  }
  static Response ErrorResponse(const ApiError& e, const std::string& rid, bool keep) {
    Response res = JsonResponse(static_cast<http::status>(e.http_status), ErrorBody(e), rid, keep);
    if (e.http_status == 429 || e.http_status == 503) res.set(http::field::retry_after, "1");
    if (e.http_status == 401) res.set(http::field::www_authenticate, "Bearer");
    return res;
  }

  // Writes one whole response; false when the client is gone or the connection must close.
  awaitable<bool> Send(beast::tcp_stream& stream, Response res) {
    res.prepare_payload();
    boost::system::error_code ec;
    stream.expires_after(opts_.write_timeout);  // a client that stops reading is cut
    co_await http::async_write(stream, res, asio::redirect_error(use_awaitable, ec));
    stream.expires_never();
    co_return !ec && res.keep_alive();
  }

  static bool IsApi(const std::string& path) {
    return path == "/v1/completions" || path == "/v1/chat/completions" || path == "/v1/classify";
  }

  awaitable<bool> Handle(beast::tcp_stream& stream, const Request& req) {
    const std::string given_id(req["X-Request-Id"]);
    const std::string rid = UsableId(given_id) ? given_id : NewRequestId();
    std::string path(req.target());
    if (auto q = path.find('?'); q != std::string::npos) path.resize(q);
    if (path == "/classify") path = "/v1/classify";  // vLLM's name for it
    if ((path == "/tokenize" || path == "/detokenize") && req.method() == http::verb::post) {
      co_return co_await TokenizeRoute(stream, req, rid, path);
    }
    if (IsApi(path) && req.method() == http::verb::post) {
      metrics_.received.fetch_add(1);
      std::optional<ApiError> unauthorized = Authorize(req);
      if (unauthorized) {
        metrics_.End(Outcome::kRejected);
        co_return co_await Send(stream, ErrorResponse(*unauthorized, rid, req.keep_alive()));
      }
      co_return co_await Generate(stream, req, rid, path);
    }
    co_return co_await Send(stream, Route(req, path, rid));
  }

  std::optional<ApiError> Authorize(const Request& req) const {
    if (opts_.api_key.empty()) return std::nullopt;
    const std::string auth(req[http::field::authorization]);
    if (const auto token = BearerToken(auth); token && SameKey(*token, opts_.api_key)) {
      return std::nullopt;
    }
    return ApiError{
        401,
        auth.empty() ? "missing API key: send 'Authorization: Bearer KEY'" : "the API key is wrong",
        "authentication_error", "", "invalid_api_key"};
  }

  // Every route but the three that run the model.
  Response Route(const Request& req, const std::string& path, const std::string& rid) {
    const bool keep = req.keep_alive();
    const bool get = req.method() == http::verb::get;
    if (path == "/health" && get)
      return JsonResponse(http::status::ok, json{{"status", "ok"}}, rid, keep);
    if (path == "/ready" && get) {
      const auto lost = scheduler_.lost();
      if (ready.load() && !lost)
        return JsonResponse(http::status::ok, json{{"ready", true}}, rid, keep);
      const std::string why =
          lost ? "a rank was lost: " + lost->message() : "the first generation has not finished";
      return JsonResponse(http::status::service_unavailable,
                          json{{"ready", false}, {"reason", why}}, rid, keep);
    }
    if (path == "/version" && get) {
      return JsonResponse(http::status::ok, json{{"version", Version()}, {"commit", GitCommit()}},
                          rid, keep);
    }
    const std::string models = "/v1/models/";
    const bool known = IsApi(path) || path == "/health" || path == "/ready" || path == "/metrics" ||
                       path == "/v1/models" || path.rfind(models, 0) == 0 || path == "/tokenize" ||
                       path == "/detokenize";
    if (!known)
      return ErrorResponse(
          ApiError{404, "no route " + path, "invalid_request_error", "", "not_found"}, rid, keep);
    const bool open_metrics = path == "/metrics" && opts_.metrics_open;  // Prometheus without the key
    if (!open_metrics) {
      if (auto e = Authorize(req)) return ErrorResponse(*e, rid, keep);
    }
    if (path == "/metrics" && get) {
      Response res{http::status::ok, 11};
      res.set(http::field::content_type, "text/plain; version=0.0.4");
      res.set("X-Request-Id", rid);
      res.keep_alive(keep);
      res.body() = metrics_.Render(facts_.served_name);
      return res;
    }
    const json model = {{"id", facts_.served_name},
                        {"object", "model"},
                        {"created", created_},
                        {"owned_by", "gemma2-cluster"},
                        {"max_model_len", facts_.config->max_position_embeddings},
                        {"quantization", facts_.quantization},
                        {"kv_cache_dtype", facts_.kv_cache_dtype}};
    if (path == "/v1/models" && get) {
      return JsonResponse(http::status::ok,
                          json{{"object", "list"}, {"data", json::array({model})}}, rid, keep);
    }
    if (path.rfind(models, 0) == 0 && get) {
      if (path.substr(models.size()) == facts_.served_name)
        return JsonResponse(http::status::ok, model, rid, keep);
      return ErrorResponse(ApiError{404,
                                    "the model '" + path.substr(models.size()) +
                                        "' does not exist; this server serves '" +
                                        facts_.served_name + "'",
                                    "invalid_request_error", "model", "model_not_found"},
                           rid, keep);
    }
    return ErrorResponse(
        ApiError{405, "method " + std::string(req.method_string()) + " is not allowed on " + path},
        rid, keep);
  }

  struct Admitted {
    std::shared_ptr<RequestHandle> handle;
    std::shared_ptr<SessionWaker> waker;  // the scheduler's notify (serving/session_waker.h)
  };

  // Parses and submits; on rejection the error response, counted as rejected.
  std::variant<Admitted, ApiError> Admit(const Request& req, const std::string& rid,
                                         const std::string& path) {
    const std::string type(req[http::field::content_type]);
    if (!type.empty() && type.rfind("application/json", 0) != 0) {
      return ApiError{415, "Content-Type must be application/json, not " + type};
    }
    auto body = ParseJsonBody(req.body(), facts_.limits.max_json_depth);
    if (auto* e = std::get_if<ApiError>(&body)) return *e;
    const RequestJson& j = std::get<RequestJson>(body);
    auto parsed = path == "/v1/completions"        ? ParseCompletions(j, facts_)
                  : path == "/v1/chat/completions" ? ParseChat(j, facts_)
                                                   : ParseClassify(j, facts_);
    if (auto* e = std::get_if<ApiError>(&parsed)) return *e;
    auto handle = std::make_shared<RequestHandle>(rid, std::move(std::get<ParsedRequest>(parsed)));
    auto waker = std::make_shared<SessionWaker>(ioc_);
    handle->notify = [waker] { waker->Notify(); };
    if (auto e = scheduler_.Submit(handle)) return *e;
    return Admitted{handle, waker};
  }

  // Runs `fn` on the parsing pool: a body of megabytes takes a while to parse and tokenize, and
  // the I/O thread serves every other connection meanwhile. What `fn` reads outlives the wait
  // (the calling frame holds it), and Stop joins the pool before any frame can go. An exception
  // becomes a 500 for that request.
  template <typename T, typename Fn>
  awaitable<std::variant<T, ApiError>> OffThread(Fn fn) {
    auto result = std::make_shared<std::optional<std::variant<T, ApiError>>>();
    auto done = std::make_shared<asio::steady_timer>(ioc_, asio::steady_timer::time_point::max());
    asio::post(parse_pool_, [this, result, done, &fn] {
      try {
        *result = fn();
      } catch (const std::exception& e) {
        *result = ApiError{500, std::string("the request could not be parsed: ") + e.what(),
                           "server_error"};
      }
      asio::post(ioc_, [done] { done->cancel(); });
    });
    // The pool's cancel is posted to this thread after the result is written, so it runs after
    // this wait has begun and the result is visible when it ends.
    boost::system::error_code ec;
    co_await done->async_wait(asio::redirect_error(use_awaitable, ec));
    co_return std::move(**result);
  }

  // POST /tokenize and /detokenize (vLLM's shapes), off the I/O thread.
  awaitable<bool> TokenizeRoute(beast::tcp_stream& stream, const Request& req,
                                const std::string& rid, const std::string& path) {
    const bool keep = req.keep_alive();
    if (auto e = Authorize(req)) co_return co_await Send(stream, ErrorResponse(*e, rid, keep));
    auto answer = co_await OffThread<json>([&]() -> std::variant<json, ApiError> {
      auto body = ParseJsonBody(req.body(), facts_.limits.max_json_depth);
      if (auto* e = std::get_if<ApiError>(&body)) return *e;
      auto r = path == "/tokenize" ? ParseTokenize(std::get<RequestJson>(body), facts_)
                                   : ParseDetokenize(std::get<RequestJson>(body), facts_);
      if (auto* e = std::get_if<ApiError>(&r)) return *e;
      return std::get<json>(std::move(r));
    });
    if (auto* e = std::get_if<ApiError>(&answer))
      co_return co_await Send(stream, ErrorResponse(*e, rid, keep));
    co_return co_await Send(stream, JsonResponse(http::status::ok, std::get<json>(answer), rid, keep));
  }

  // One access-log line per API request, when it ends (common/log.h; a field per fact).
  static void AccessLog(beast::tcp_stream& stream, const std::string& rid, const std::string& path,
                        int status, const RequestHandle* h, const std::string& error) {
    boost::system::error_code ec;
    const auto peer = stream.socket().remote_endpoint(ec);
    log::Fields f = {{"request_id", rid},
                     {"route", path},
                     {"status", std::to_string(status)},
                     {"client", ec ? "?" : peer.address().to_string() + ":" + std::to_string(peer.port())}};
    if (h) {
      MutexLock lock(const_cast<RequestHandle*>(h)->mu);
      const auto ms = [&](auto d) {
        return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
      };
      std::string reasons;
      for (const auto& c : h->choices) {
        if (!c.finish_reason.empty() && reasons.find(c.finish_reason) == std::string::npos)
          reasons += (reasons.empty() ? "" : ",") + c.finish_reason;
      }
      f.push_back({"prompt_tokens", std::to_string(h->prompt_tokens)});
      f.push_back({"completion_tokens", std::to_string(h->completion_tokens)});
      if (h->first_token_at) f.push_back({"ttft_ms", ms(*h->first_token_at - h->arrival())});
      f.push_back({"duration_ms", ms(std::chrono::steady_clock::now() - h->arrival())});
      f.push_back({"finish_reason", reasons.empty() ? "-" : reasons});
      if (h->error) f.push_back({"error", h->error->message});
    }
    if (!error.empty()) f.push_back({"error", error});
    log::Info("request", f);
  }

  awaitable<bool> Generate(beast::tcp_stream& stream, const Request& req, const std::string& rid,
                           const std::string& path) {
    const bool keep = req.keep_alive();
    auto admitted = co_await OffThread<Admitted>([&] { return Admit(req, rid, path); });
    if (auto* e = std::get_if<ApiError>(&admitted)) {
      metrics_.End(Outcome::kRejected);
      AccessLog(stream, rid, path, e->http_status, nullptr, e->message);
      co_return co_await Send(stream, ErrorResponse(*e, rid, keep));
    }
    auto [handle, waker] = std::get<Admitted>(std::move(admitted));
    const ParsedRequest& pr = handle->request();
    const ResponseContext ctx = Context(pr, rid);
    if (pr.gen.stream && pr.endpoint != Endpoint::kClassify) {
      const bool kept = co_await Stream(stream, *handle, *waker, ctx, rid, keep);
      AccessLog(stream, rid, path, 200, handle.get(), handle->cancelled() ? "client gone" : "");
      co_return kept;
    }
    while (true) {
      std::optional<Response> res;
      {
        MutexLock lock(handle->mu);
        if (handle->done) res = Final(*handle, ctx, rid, keep);
      }
      if (res) {
        const int status = static_cast<int>(res->result_int());
        const bool kept = co_await Send(stream, std::move(*res));
        AccessLog(stream, rid, path, status, handle.get(), "");
        co_return kept;
      }
      if (ClientGone(stream.socket())) {
        handle->Cancel();
        AccessLog(stream, rid, path, 499, handle.get(), "client gone");
        co_return false;
      }
      co_await Wait(*waker);
    }
  }

  // Until the scheduler touches the request (at once if it did since the last Wait), or kPoll.
  static awaitable<void> Wait(SessionWaker& waker) { return waker.Wait(kPoll); }

  ResponseContext Context(const ParsedRequest& pr, const std::string& rid) const {
    const char* prefix = pr.endpoint == Endpoint::kChat          ? "chatcmpl-"
                         : pr.endpoint == Endpoint::kCompletions ? "cmpl-"
                                                                 : "classify-";
    const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    return ResponseContext{prefix + rid, now, facts_.served_name, facts_.tokenizer, facts_.config};
  }

  // The whole answer of a finished request.
  static Response Final(const RequestHandle& h, const ResponseContext& ctx, const std::string& rid,
                        bool keep) REQUIRES(h.mu) {
    if (h.error) return ErrorResponse(*h.error, rid, keep);
    switch (h.request().endpoint) {
      case Endpoint::kCompletions:
        return JsonResponse(http::status::ok, CompletionBody(ctx, h), rid, keep);
      case Endpoint::kChat:
        return JsonResponse(http::status::ok, ChatBody(ctx, h), rid, keep);
      case Endpoint::kClassify:
        break;
    }
    return JsonResponse(http::status::ok, ClassifyBody(ctx, h), rid, keep);
  }

  awaitable<bool> Stream(beast::tcp_stream& stream, RequestHandle& h, SessionWaker& waker,
                         const ResponseContext& ctx, const std::string& rid, bool keep) {
    http::response<http::empty_body> res{http::status::ok, 11};
    res.set(http::field::content_type, "text/event-stream");
    res.set(http::field::cache_control, "no-cache");
    res.set("X-Request-Id", rid);
    res.keep_alive(keep);
    res.chunked(true);
    http::response_serializer<http::empty_body> sr{res};
    boost::system::error_code ec;
    // Every write of the stream has --write-timeout: a client that stops reading while tokens
    // keep coming is cut (its request cancelled, its KV blocks freed) instead of holding them.
    stream.expires_after(opts_.write_timeout);
    co_await http::async_write_header(stream, sr, asio::redirect_error(use_awaitable, ec));
    stream.expires_never();
    if (ec) {
      h.Cancel();
      co_return false;
    }
    StreamCursor cursor;
    while (true) {
      std::string events;
      bool done;
      std::optional<ApiError> error;
      {
        MutexLock lock(h.mu);
        events = StreamEvents(ctx, h, cursor);
        done = h.done;
        error = h.error;
        if (done && !error) {
          if (h.request().gen.include_usage) events += UsageEvent(ctx, h);
          events += "data: [DONE]\n\n";
        }
      }
      if (error)
        events +=
            "data: " + ErrorBody(*error).dump(-1, ' ', false, json::error_handler_t::replace) +
            "\n\n";
      if (!events.empty()) {
        stream.expires_after(opts_.write_timeout);
        co_await asio::async_write(stream, http::make_chunk(asio::buffer(events)),
                                   asio::redirect_error(use_awaitable, ec));
        stream.expires_never();
        if (ec) {
          h.Cancel();
          co_return false;
        }
      }
      if (done) {
        stream.expires_after(opts_.write_timeout);
        co_await asio::async_write(stream, http::make_chunk_last(),
                                   asio::redirect_error(use_awaitable, ec));
        stream.expires_never();
        co_return !ec && !error && keep;  // after an error event the stream is closed
      }
      if (ClientGone(stream.socket())) {
        h.Cancel();
        co_return false;
      }
      co_await Wait(waker);
    }
  }

  Scheduler& scheduler_;
  Metrics& metrics_;
  ModelFacts facts_;
  ServerOptions opts_;
  asio::io_context ioc_{1};
  // Parsing and tokenizing request bodies, off the I/O thread.
  asio::thread_pool parse_pool_{std::max(1u, std::min(4u, std::thread::hardware_concurrency()))};
  tcp::acceptor acceptor_;
  std::thread thread_;
  int port_ = 0;
  int sessions_ = 0;  // open connections (I/O thread only)
  std::atomic<int> answering_{0};  // sessions with a request in progress (Answering)
  std::list<IdleMark*> idle_;  // sessions waiting for a request header, longest waiting first
  int64_t created_ = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
};

HttpServer::HttpServer(Scheduler& scheduler, Metrics& metrics, ModelFacts facts, ServerOptions opts)
    : impl_(std::make_unique<Impl>(scheduler, metrics, std::move(facts), std::move(opts))) {}
HttpServer::~HttpServer() { Stop(); }
Status HttpServer::Start() { return impl_->Start(); }
int HttpServer::port() const { return impl_->port(); }
void HttpServer::SetReady(bool ready) { impl_->ready.store(ready); }
void HttpServer::StopAccepting() { impl_->StopAccepting(); }
void HttpServer::Stop() { impl_->Stop(); }
bool HttpServer::WaitForResponses(std::chrono::steady_clock::time_point deadline) const {
  return impl_->WaitForResponses(deadline);
}

}  // namespace gemma2::serving
