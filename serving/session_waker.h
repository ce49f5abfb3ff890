// How the scheduler wakes an HTTP session waiting for its request's progress (serving/
// http_server.cc). Notify (any thread) sets `pending` and cancels the timer's wait on the
// session's io thread; Wait returns at once when a notify came since the last Wait, else when
// notified or after `poll`. The flag keeps a notify that lands while the session is busy (a
// stream's write: no wait is on, the cancel finds nothing) from being lost: the session would
// sleep until the next step or the poll, and two tokens would reach the client as one.
// The io_context must run on one thread (a posted cancel then runs only once a wait is on).
#pragma once

#include <atomic>
#include <boost/asio.hpp>
#include <chrono>
#include <memory>

namespace gemma2::serving {

class SessionWaker : public std::enable_shared_from_this<SessionWaker> {
 public:
  explicit SessionWaker(boost::asio::io_context& ioc) : timer_(ioc) {}

  void Notify() {
    pending_.store(true);
    boost::asio::post(timer_.get_executor(), [self = shared_from_this()] { self->timer_.cancel(); });
  }

  boost::asio::awaitable<void> Wait(std::chrono::milliseconds poll) {
    if (pending_.exchange(false)) co_return;
    timer_.expires_after(poll);
    boost::system::error_code ec;
    co_await timer_.async_wait(boost::asio::redirect_error(boost::asio::use_awaitable, ec));
    pending_.store(false);  // what woke it is read next
  }

 private:
  boost::asio::steady_timer timer_;
  std::atomic<bool> pending_{false};
};

}  // namespace gemma2::serving
