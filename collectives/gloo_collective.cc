#include "collectives/gloo_collective.h"

#include <gloo/allreduce.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <unistd.h>

namespace gemma2 {
namespace {

std::string Who(const GlooOptions& o) {
  char host[256] = "?";
  ::gethostname(host, sizeof(host) - 1);
  return "gloo rank " + std::to_string(o.rank) + "/" + std::to_string(o.size) + " on " + host +
         " (pid " + std::to_string(::getpid()) + ")";
}

// Gloo reports failures as exceptions; they stop here.
Status FromException(const GlooOptions& o, const char* what, const std::exception& e) {
  const std::string msg = Who(o) + ": " + what + ": " + e.what();
  const std::string text = e.what();
  if (text.find("imed out") != std::string::npos || text.find("imeout") != std::string::npos) {
    return Status(StatusCode::kDeadlineExceeded, msg);
  }
  return Status(StatusCode::kUnavailable, msg);
}

}  // namespace

GlooCollective::~GlooCollective() = default;

Result<std::unique_ptr<GlooCollective>> GlooCollective::Create(const GlooOptions& opts,
                                                               gloo::rendezvous::Store& store) {
  if (opts.size < 1 || opts.rank < 0 || opts.rank >= opts.size) {
    return InvalidArgument("gloo: rank " + std::to_string(opts.rank) + " outside size " +
                           std::to_string(opts.size));
  }
  std::unique_ptr<GlooCollective> c(new GlooCollective(opts));
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = opts.hostname;
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(opts.rank, opts.size);
    context->setTimeout(opts.timeout);
    context->connectFullMesh(store, device);
    c->context_ = std::move(context);
  } catch (const std::exception& e) {
    return FromException(opts, "connecting to the group", e);
  }
  return c;
}

Result<std::unique_ptr<GlooCollective>> GlooCollective::CreateWithFileStore(
    const GlooOptions& opts, const std::string& dir, const std::string& prefix) {
  try {
    gloo::rendezvous::FileStore files(dir);
    if (prefix.empty()) return Create(opts, files);
    gloo::rendezvous::PrefixStore store(prefix, files);
    return Create(opts, store);
  } catch (const std::exception& e) {
    return FromException(opts, ("opening the rendezvous directory " + dir).c_str(), e);
  }
}

Status GlooCollective::AllReduceSum(Tensor& t) {
  if (opts_.size == 1 || t.numel() == 0) return OkStatus();  // the identity, for any dtype
  if (t.dtype != DType::kF32) return Internal(Who(opts_) + ": all-reduce of a non-fp32 tensor");
  try {
    gloo::AllreduceOptions o(context_);
    o.setOutput(t.as<float>(), static_cast<size_t>(t.numel()));
    o.setReduceFunction([](void* a, const void* b, const void* c, size_t n) {
      auto* out = static_cast<float*>(a);
      const auto* x = static_cast<const float*>(b);
      const auto* y = static_cast<const float*>(c);
      for (size_t i = 0; i < n; ++i) out[i] = x[i] + y[i];
    });
    o.setTag(tag_++);
    o.setTimeout(opts_.timeout);
    gloo::allreduce(o);
  } catch (const std::exception& e) {
    return FromException(opts_, "all-reduce", e);
  }
  return OkStatus();
}

Status GlooCollective::SendTo(const Tensor& t, int peer) {
  try {
    auto buf =
        context_->createUnboundBuffer(t.data, static_cast<size_t>(t.numel()) * DTypeSize(t.dtype));
    buf->send(peer, tag_++);
    if (!buf->waitSend(opts_.timeout)) {
      return Status(StatusCode::kDeadlineExceeded,
                    Who(opts_) + ": send to " + std::to_string(peer) + " timed out");
    }
  } catch (const std::exception& e) {
    return FromException(opts_, "send", e);
  }
  return OkStatus();
}

Status GlooCollective::RecvFrom(Tensor& t, int peer) {
  try {
    auto buf =
        context_->createUnboundBuffer(t.data, static_cast<size_t>(t.numel()) * DTypeSize(t.dtype));
    buf->recv(peer, tag_++);
    if (!buf->waitRecv(opts_.timeout)) {
      return Status(StatusCode::kDeadlineExceeded,
                    Who(opts_) + ": receive from " + std::to_string(peer) + " timed out");
    }
  } catch (const std::exception& e) {
    return FromException(opts_, "receive", e);
  }
  return OkStatus();
}

}  // namespace gemma2
