// Continuous batching over a StepExecutor (the in-process engine or the cluster): requests join
// and leave the running batch at every step; long prompts are prefilled in chunks mixed with the
// decode tokens of running sequences; a KV block budget (BlockManager) bounds the batch and a
// sequence that cannot grow is preempted and later recomputed. The scheduler runs on its own
// thread and is the only user of the executor.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <limits>
#include <list>
#include <memory>
#include <optional>
#include <random>
#include <thread>

#include "common/mutex.h"
#include "model/step_executor.h"
#include "model/tokenizer.h"
#include "serving/block_manager.h"
#include "serving/metrics.h"
#include "serving/output_constraints.h"
#include "serving/prefix_cache.h"
#include "serving/step_trace.h"
#include "serving/request_handle.h"
#include "serving/text_output.h"

namespace gemma2::serving {

struct SchedulerOptions {
  int max_running = 64;           // sequences in the running batch
  int max_queue = 256;            // requests waiting; past it, Submit answers 429
  int64_t max_step_tokens = 256;  // tokens per step (decode tokens + prefill chunks)
  // The KV budget in the executor's blocks: all it has, or fewer (tests).
  int64_t kv_blocks = std::numeric_limits<int64_t>::max();
  // Finished sequences kept as reusable prompt prefixes (0: no prefix caching). They hold KV
  // blocks until evicted (least recently used first) for admissions or growth.
  size_t prefix_cache_entries = 256;
  // Between steps: how the executor is watched while idle (the cluster's heartbeats). Returns
  // early when *wake turns true; an error means the executor is lost.
  std::function<Status(std::chrono::milliseconds, const std::atomic<bool>* wake)> idle_watch;
  // Called (from any thread) when work arrives, to end an idle_watch's sleep at once.
  std::function<void()> idle_wake;
  // Where every step's phases go (gemma2-launch --trace); null: nowhere.
  StepTrace* trace = nullptr;
};

enum class SeqState : uint8_t;  // a sequence's state and its allowed moves (scheduler.cc)

class Scheduler {
 public:
  Scheduler(StepExecutor& executor, const Tokenizer* tokenizer, Metrics& metrics,
            SchedulerOptions opts);
  // Stops the thread; requests still open end with an error.
  ~Scheduler();  // NOLINT(bugprone-exception-escape): only allocation can throw

  // Queues a request; an error (429 queue full, 503 draining or lost) means it was not queued.
  std::optional<ApiError> Submit(std::shared_ptr<RequestHandle> request) EXCLUDES(mu_);
  // Refuse new requests from now on; true once nothing is queued or running.
  void BeginDrain() EXCLUDES(mu_);
  bool Idle() const;
  // Set when a step failed (a rank lost): every later Submit fails with it.
  std::optional<Status> lost() const EXCLUDES(mu_);

 private:
  struct Sequence;
  // Moves a sequence to its next state (the allowed moves: scheduler.cc's SeqState).
  void Enter(Sequence& s, SeqState next);
  void Loop() EXCLUDES(mu_);
  // Builds a plan over running sequences not in flight, at most `most` of them.
  void Schedule(std::vector<Sequence*>& batch, StepPlan& plan, size_t most);
  // Keeps up to the executor's pipeline depth of steps in flight, then completes the oldest.
  Status Advance();
  struct InFlightStep;
  // A step the executor refused without running it (it stays healthy): its requests fail, with
  // the reason; every other request goes on.
  void FailRefused(const InFlightStep& f, const Status& why);
  void Trace(const char* name, Clock::time_point begin, Clock::time_point end, int lane,
             const InFlightStep& f);
  void Apply(InFlightStep& f, const StepOutput& out);
  void AttachTokenMasks(InFlightStep& f);
  void Admit();
  void DropCancelled();
  void Preempt(Sequence& s);
  struct Request;
  void Expand(const std::shared_ptr<RequestHandle>& h);
  void Finish(Sequence& s);
  void AcceptToken(Sequence& s, int32_t token, const StepOutput& out, int64_t row);
  void PromptRow(Sequence& s, std::span<const float> row);
  void Classified(Sequence& s);
  void Remove(Sequence& s);
  void ReleaseKv(Sequence& s);
  void ReusePrefix(Sequence& s);
  void DropPendingCopy(int64_t engine_id);
  bool EvictCached();
  bool Donate(Sequence& s);
  void Sweep();
  void CloseRequest(Request& r, Outcome o, std::optional<ApiError> error);
  // A successful generation's latency phases and token counts into the metrics.
  void ObservePhases(const Request& r);
  void FailAll(const ApiError& e) EXCLUDES(mu_);
  void IdleWait() EXCLUDES(mu_);
  void PublishGauges();
  void NotifyTouched();

  StepExecutor& executor_;
  const Tokenizer* tokenizer_;
  Metrics& metrics_;
  SchedulerOptions opts_;
  BlockManager blocks_;
  PrefixCache cache_;
  // Copies planned at admission, run with the next step: (cache entry, copy).
  std::vector<std::pair<int64_t, KvCopy>> pending_copies_;
  // Steps submitted and not yet collected, oldest first (more than one: pipelined stages).
  std::deque<InFlightStep> in_flight_;

  // What other threads hand the scheduler thread.
  mutable Mutex mu_;
  std::condition_variable_any cv_;  // incoming_ or stop_ changed
  std::deque<std::shared_ptr<RequestHandle>> incoming_ GUARDED_BY(mu_);
  bool draining_ GUARDED_BY(mu_) = false;
  bool stop_ GUARDED_BY(mu_) = false;
  std::optional<Status> lost_ GUARDED_BY(mu_);
  std::atomic<bool> wake_{false};

  // The scheduler thread's alone (no lock): it is the only one that runs the members below.
  std::deque<std::unique_ptr<Sequence>> waiting_;        // not yet (or no longer) holding KV
  std::list<std::unique_ptr<Sequence>> running_;         // admission order
  std::vector<std::shared_ptr<RequestHandle>> touched_;  // to notify after this step
  std::atomic<int64_t> open_requests_{0};                // submitted and not yet closed
  std::atomic<int64_t> queued_requests_{0};              // submitted, no sequence admitted yet
  int64_t steps_submitted_ = 0;
  std::mt19937_64 seeds_{std::random_device{}()};        // seeds of unseeded requests, seeded once
  structured::TokenMask mask_;                           // scratch: a structured row's tokens
  std::thread thread_;
};

}  // namespace gemma2::serving
