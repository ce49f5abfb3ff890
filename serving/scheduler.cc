#include "serving/scheduler.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "common/log.h"
#include "serving/tool_calls.h"

namespace gemma2::serving {
namespace {

ApiError ServerError(int status, std::string message, std::string type) {
  return ApiError{status, std::move(message), std::move(type), "", ""};
}

template <typename T>
bool Contains(const std::vector<T>& v, int32_t x) {
  return std::find(v.begin(), v.end(), static_cast<T>(x)) != v.end();
}

}  // namespace

// A request as the scheduler tracks it: its handle and how many of its sequences are unfinished.
struct Scheduler::Request {
  std::shared_ptr<RequestHandle> handle;
  int remaining = 0;
  bool admitted = false, first_token = false, closed = false;
  // When it was admitted into the running batch and gave its first token (the metrics' phases).
  std::chrono::steady_clock::time_point admitted_at{}, first_token_at{};
};

// One prompt's choice (generation) or one input (classification).
// A sequence's life, one state at a time; Scheduler::Enter allows only these moves:
//   kWaiting  -> kRunning   admitted: an executor sequence and KV blocks of its own
//   kRunning  -> kInFlight  in a submitted step (neither scheduled, preempted nor removed)
//   kInFlight -> kRunning   its step came back (applied next)
//   kRunning  -> kWaiting   preempted: KV given back, prompt + generated prefilled again later
//   kWaiting, kRunning -> kFinished  its last token, or its request closed; KV released or
//                                    donated to the prefix cache; it leaves the lists at Sweep
// Its request's own end (Request::closed: failed, cancelled, done) reaches a sequence in flight
// when the step is back.
enum class SeqState : uint8_t { kWaiting, kRunning, kInFlight, kFinished };

namespace {

const char* SeqStateName(SeqState s) {
  switch (s) {
    case SeqState::kWaiting:
      return "waiting";
    case SeqState::kRunning:
      return "running";
    case SeqState::kInFlight:
      return "in flight";
    case SeqState::kFinished:
      return "finished";
  }
  return "?";
}

bool AllowedMove(SeqState from, SeqState to) {
  using S = SeqState;
  switch (from) {
    case S::kWaiting:
      return to == S::kRunning || to == S::kFinished;
    case S::kRunning:
      return to == S::kInFlight || to == S::kWaiting || to == S::kFinished;
    case S::kInFlight:
      return to == S::kRunning;
    case S::kFinished:
      return to == S::kFinished;  // removing what already finished
  }
  return false;
}

}  // namespace

struct Scheduler::Sequence {
  std::shared_ptr<Request> req;
  int index = 0;  // into handle->choices or handle->classified
  std::vector<int32_t> prompt, generated;
  SeqState state = SeqState::kWaiting;
  int64_t engine_id = -1;  // the executor's sequence (kRunning, kInFlight)
  int64_t computed = 0;    // tokens in the KV cache
  int64_t blocks = 0;      // KV blocks held
  RowSampling sampling;
  TokenCounts counts;
  std::unique_ptr<TextOutput> text;
  int prompt_top = -1;  // >= 0: this sequence gives its prompt's log-probabilities (top k)
  std::vector<TokenLogprobs> prompt_lp;  // those of prompt tokens 1.. so far
  std::optional<ConstraintState> structure;  // structured output: where the choice stands
  int64_t class_row = -1;  // sequence classification: the scored position
  std::vector<std::vector<float>> class_rows;
  Clock::time_point last_token{};

  const GenerationOptions& gen() const { return req->handle->request().gen; }
  bool classify() const { return req->handle->request().endpoint == Endpoint::kClassify; }
  int64_t total() const { return static_cast<int64_t>(prompt.size() + generated.size()); }
  // Whether position i's output row gives a prompt token's log-probabilities (token i + 1).
  bool prompt_row(int64_t i) const {
    return prompt_top >= 0 && i + 1 < static_cast<int64_t>(prompt.size()) &&
           i >= static_cast<int64_t>(prompt_lp.size());
  }
  int32_t token(int64_t i) const {
    const auto p = static_cast<int64_t>(prompt.size());
    return i < p ? prompt[static_cast<size_t>(i)] : generated[static_cast<size_t>(i - p)];
  }
};

struct Scheduler::InFlightStep {
  std::vector<Sequence*> batch;
  StepPlan plan;
  int64_t number = 0;             // the trace's step count
  Clock::time_point submitted{};  // when the executor took it
  std::vector<int64_t> pinned;  // cache entries whose prefix copies it carries (in plan.kv_copies)
};

Scheduler::Scheduler(StepExecutor& executor, const Tokenizer* tokenizer, Metrics& metrics,
                     SchedulerOptions opts)
    : executor_(executor),
      tokenizer_(tokenizer),
      metrics_(metrics),
      opts_(std::move(opts)),
      blocks_(std::min(opts_.kv_blocks, executor.kv_blocks()), executor.kv_layout(),
              opts_.max_step_tokens),
      cache_(executor.kv_layout().block_size, opts_.prefix_cache_entries) {
  PublishGauges();
  thread_ = std::thread([this] { Loop(); });
}

// Only allocation can throw here (FailAll's answers); terminating then is the right end.
Scheduler::~Scheduler() {  // NOLINT(bugprone-exception-escape)
  {
    MutexLock lock(mu_);
    stop_ = true;
  }
  wake_ = true;
  cv_.notify_all();
  if (opts_.idle_wake) opts_.idle_wake();
  thread_.join();
  FailAll(ServerError(503, "the server is shutting down", "server_error"));
}

std::optional<ApiError> Scheduler::Submit(std::shared_ptr<RequestHandle> request) {
  {
    MutexLock lock(mu_);
    if (lost_) {
      return ServerError(503, "the cluster is down: " + lost_->message(), "server_error");
    }
    if (draining_ || stop_) return ServerError(503, "the server is shutting down", "server_error");
    const ParsedRequest& p = request->request();
    for (const auto& prompt : p.prompts) {  // one that can never fit is refused now, not midway
      // Saturating: max_tokens may be anything up to INT64_MAX here.
      const int64_t asked = p.endpoint == Endpoint::kClassify ? 0 : p.gen.max_tokens;
      const int64_t len = static_cast<int64_t>(prompt.size());
      const int64_t tokens = asked > INT64_MAX - len ? INT64_MAX : len + asked;
      if (blocks_.BlocksFor(tokens) > blocks_.total()) {
        return ApiError{400,
                        "prompt + max_tokens = " + std::to_string(tokens) + " tokens need " +
                            std::to_string(blocks_.BlocksFor(tokens)) +
                            " KV blocks; the server has " + std::to_string(blocks_.total()),
                        "invalid_request_error", "max_tokens", ""};
      }
    }
    if (queued_requests_.load() >= opts_.max_queue) {
      return ServerError(429,
                         "the queue is full (" + std::to_string(opts_.max_queue) +
                             " requests waiting); retry later",
                         "rate_limit_exceeded");
    }
    ++queued_requests_;
    ++open_requests_;
    incoming_.push_back(std::move(request));
  }
  wake_ = true;
  cv_.notify_all();
  if (opts_.idle_wake) opts_.idle_wake();
  return std::nullopt;
}

void Scheduler::BeginDrain() {
  MutexLock lock(mu_);
  draining_ = true;
}

bool Scheduler::Idle() const { return open_requests_.load() == 0; }

std::optional<Status> Scheduler::lost() const {
  MutexLock lock(mu_);
  return lost_;
}

void Scheduler::Expand(const std::shared_ptr<RequestHandle>& h) {
  auto req = std::make_shared<Request>();
  req->handle = h;
  const ParsedRequest& p = h->request();
  const bool classify = p.endpoint == Endpoint::kClassify;
  const int n = classify ? 1 : p.gen.n;
  const uint64_t base_seed =
      p.gen.seed ? *p.gen.seed : seeds_();  // unseeded requests: a fresh seed each
  {
    MutexLock lock(h->mu);
    if (classify)
      h->classified.resize(p.prompts.size());
    else
      h->choices.resize(p.prompts.size() * static_cast<size_t>(n));
    if (p.prompt_top() >= 0) h->prompt_logprobs.resize(p.prompts.size());
    for (const auto& pr : p.prompts) h->prompt_tokens += static_cast<int64_t>(pr.size());
  }
  const ModelConfig& c = executor_.config();
  for (size_t i = 0; i < p.prompts.size(); ++i) {
    for (int j = 0; j < n; ++j) {
      auto s = std::make_unique<Sequence>();
      s->req = req;
      s->index = static_cast<int>(i) * n + j;
      s->prompt = p.prompts[i];
      if (classify) {
        if (c.architecture == Architecture::kSequenceClassification) {
          s->class_row = 0;  // transformers: the last non-pad token (the first when all are pad)
          for (int64_t k = static_cast<int64_t>(s->prompt.size()) - 1; k >= 0; --k) {
            if (s->prompt[static_cast<size_t>(k)] != c.pad_token_id) {
              s->class_row = k;
              break;
            }
          }
        }
      } else {
        s->sampling.params = p.gen.Sampling(j);
        s->sampling.params.seed = base_seed + static_cast<uint64_t>(j);
        s->text = std::make_unique<TextOutput>(tokenizer_, p.gen.stop,
                                               p.gen.include_stop_str_in_output,
                                               p.gen.skip_special_tokens);
        if (j == 0) s->prompt_top = p.prompt_top();  // the first choice speaks for its prompt
        if (p.gen.constraint) s->structure.emplace(p.gen.constraint);
      }
      ++req->remaining;
      waiting_.push_back(std::move(s));
    }
  }
}

void Scheduler::Loop() {
  while (true) {
    {
      MutexLock lock(mu_);
      if (stop_) return;
      while (!incoming_.empty()) {
        Expand(incoming_.front());
        incoming_.pop_front();
      }
    }
    DropCancelled();
    Admit();
    PublishGauges();
    if (running_.empty() && in_flight_.empty()) {
      IdleWait();
      continue;
    }
    Status st;
    try {
      st = Advance();
    } catch (const std::exception& e) {  // e.g. out of memory: fail loudly, never hang
      st = Internal(std::string("the scheduler failed: ") + e.what());
    }
    PublishGauges();  // before anyone hears of this step's outcomes
    NotifyTouched();
    if (!st.ok()) {
      {
        MutexLock lock(mu_);
        lost_ = st;
      }
      FailAll(ServerError(503, "the request failed because the cluster failed: " + st.message(),
                          "server_error"));
    }
  }
}

void Scheduler::IdleWait() {
  wake_ = false;
  {
    MutexLock lock(mu_);
    if (!incoming_.empty() || stop_) return;
  }
  if (opts_.idle_watch && !lost()) {
    const Status st = opts_.idle_watch(std::chrono::milliseconds(100), &wake_);
    if (!st.ok()) {
      MutexLock lock(mu_);
      lost_ = st;
    }
    return;
  }
  MutexLock lock(mu_);
  const auto until = Clock::now() + std::chrono::milliseconds(100);
  while (incoming_.empty() && !stop_) {
    if (cv_.wait_until(mu_, until) == std::cv_status::timeout) break;
  }
}

// A cancelled request's sequences leave at once; their KV blocks are free for this step.
void Scheduler::DropCancelled() {
  auto close = [&](auto& list) {
    for (auto& s : list) {
      if (s->req->handle->cancelled()) CloseRequest(*s->req, Outcome::kCancelled, std::nullopt);
    }
  };
  close(running_);
  close(waiting_);
  Sweep();
}

// Sequences that finished, or whose request closed (failed, cancelled), leave both lists; one in a
// step in flight leaves once that step is back.
void Scheduler::Sweep() {
  auto gone = [&](std::unique_ptr<Sequence>& s) {
    if (s->state == SeqState::kInFlight) return false;
    if (s->state != SeqState::kFinished && !s->req->closed) return false;
    Remove(*s);
    return true;
  };
  running_.remove_if(gone);
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), gone), waiting_.end());
}

void Scheduler::Admit() {
  while (!waiting_.empty() && static_cast<int>(running_.size()) < opts_.max_running) {
    Sequence& s = *waiting_.front();
    // Room for the whole prompt (and the first generated token) before it starts; cached
    // prefixes give way first.
    while (blocks_.BlocksFor(s.total() + 1) > blocks_.free() && EvictCached()) {
    }
    if (blocks_.BlocksFor(s.total() + 1) > blocks_.free()) {
      if (!running_.empty()) break;
      if (blocks_.BlocksFor(s.total() + 1) > blocks_.total()) {  // can never fit
        CloseRequest(*s.req, Outcome::kFailed,
                     ServerError(507,
                                 "the prompt needs more KV-cache blocks than the server has (" +
                                     std::to_string(blocks_.total()) + ")",
                                 "server_error"));
        Sweep();
        continue;
      }
      break;
    }
    if (!s.req->admitted) {
      s.req->admitted = true;
      s.req->admitted_at = Clock::now();
      --queued_requests_;
    }
    s.engine_id = executor_.NewSequence();
    Enter(s, SeqState::kRunning);
    s.computed = 0;
    (void)blocks_.Grow(s.blocks, s.total() + 1);  // the prompt's blocks are reserved on admission
    ReusePrefix(s);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

// A cached prefix of the sequence's tokens is copied into its fresh cache with the next step.
// At least one token is left to compute (its output row is needed); a token classifier needs
// every row and a sequence classifier its scored row, so those reuse less or nothing.
void Scheduler::ReusePrefix(Sequence& s) {
  if (!cache_.enabled()) return;
  int64_t limit = s.total() - 1;
  if (s.prompt_top >= 0) limit = 0;  // every prompt row is needed
  if (s.classify()) limit = s.class_row < 0 ? 0 : std::min(limit, s.class_row);
  std::vector<int32_t> tokens;
  for (int64_t i = 0; i < s.total(); ++i) tokens.push_back(s.token(i));
  const PrefixCache::Match m = cache_.Find(tokens, limit);
  metrics_.prefix_query_tokens.fetch_add(static_cast<uint64_t>(std::max<int64_t>(0, limit)));
  if (m.tokens <= 0) return;
  cache_.Pin(m.entry);
  pending_copies_.push_back(
      {m.entry, KvCopy{cache_.entry(m.entry).engine_id, s.engine_id, m.tokens}});
  s.computed = m.tokens;
  metrics_.prefix_hit_tokens.fetch_add(static_cast<uint64_t>(m.tokens));
}

void Scheduler::DropPendingCopy(int64_t engine_id) {
  for (auto it = pending_copies_.begin(); it != pending_copies_.end();) {
    if (it->second.dst == engine_id) {
      cache_.Unpin(it->first);
      it = pending_copies_.erase(it);
    } else {
      ++it;
    }
  }
}

bool Scheduler::EvictCached() {
  auto e = cache_.EvictOne();
  if (!e) return false;
  executor_.ReleaseSequence(e->engine_id);
  blocks_.Release(e->blocks);
  return true;
}

// A finished sequence's cache stays as a reusable prefix when it adds whole blocks.
bool Scheduler::Donate(Sequence& s) {
  if (!cache_.enabled() || s.state != SeqState::kRunning || s.computed < blocks_.block_size())
    return false;
  if (cache_.full()) EvictCached();
  std::vector<int32_t> tokens;
  for (int64_t i = 0; i < s.computed; ++i) tokens.push_back(s.token(i));
  if (!cache_.Add(s.engine_id, std::move(tokens), s.blocks, executor_.KvCopyFloor(s.engine_id)))
    return false;
  s.engine_id = -1;  // the cache owns the executor sequence and its blocks now
  s.blocks = 0;
  s.computed = 0;
  Enter(s, SeqState::kFinished);
  return true;
}

// The sequence's KV cache, its blocks and any copy planned into it are given back.
void Scheduler::ReleaseKv(Sequence& s) {
  DropPendingCopy(s.engine_id);
  if (s.engine_id >= 0) executor_.ReleaseSequence(s.engine_id);
  s.engine_id = -1;
  s.computed = 0;
  blocks_.Release(s.blocks);
}

void Scheduler::Remove(Sequence& s) {
  ReleaseKv(s);
  Enter(s, SeqState::kFinished);
}

void Scheduler::Enter(Sequence& s, SeqState next) {
  if (!AllowedMove(s.state, next)) {  // a scheduler bug: said loudly, the request goes on
    log::Error(std::string("scheduler: a sequence moved from ") + SeqStateName(s.state) + " to " +
               SeqStateName(next));
  }
  s.state = next;
}

void Scheduler::Preempt(Sequence& s) {
  // Recompute later: prompt + generated are prefilled again; sampling counters keep draws equal.
  ReleaseKv(s);
  Enter(s, SeqState::kWaiting);
  metrics_.preemptions.fetch_add(1);
}

void Scheduler::Schedule(std::vector<Sequence*>& batch, StepPlan& plan, size_t most) {
  int64_t budget = opts_.max_step_tokens;
  std::vector<Sequence*> order;
  for (auto& s : running_) {
    if (s->state == SeqState::kRunning && s->total() - s->computed == 1)
      order.push_back(s.get());  // decoding first
  }
  for (auto& s : running_) {
    if (s->state == SeqState::kRunning && s->total() - s->computed > 1) order.push_back(s.get());
  }
  for (Sequence* s : order) {
    if (budget <= 0 || batch.size() >= most) break;
    if (s->state != SeqState::kRunning || s->req->closed) continue;  // preempted, or closed
    const int64_t take = std::min(s->total() - s->computed, budget);
    while (!blocks_.Grow(s->blocks, s->computed + take)) {
      if (EvictCached()) continue;  // cached prefixes go before running sequences
      // Preempt the youngest running sequence that is not already in this step.
      Sequence* victim = nullptr;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
        Sequence* v = it->get();
        if (v != s && v->state == SeqState::kRunning &&
            std::find(batch.begin(), batch.end(), v) == batch.end()) {
          victim = v;
          break;
        }
      }
      if (!victim) victim = s;
      Preempt(*victim);
      if (victim == s) break;
    }
    if (s->state != SeqState::kRunning) continue;  // it was the victim
    StepSequence ss;
    ss.sequence_id = s->engine_id;
    ss.start_pos = s->computed;
    for (int64_t i = 0; i < take; ++i) ss.tokens.push_back(s->token(s->computed + i));
    const int64_t end = s->computed + take;
    if (s->classify()) {
      if (s->class_row < 0) {
        for (int64_t i = 0; i < take; ++i) ss.output_rows.push_back(i);
      } else if (s->class_row >= s->computed && s->class_row < end) {
        ss.output_rows.push_back(s->class_row - s->computed);
      }
    } else {
      for (int64_t i = 0; i < take; ++i) {
        if (s->prompt_row(s->computed + i)) ss.output_rows.push_back(i);
      }
    }
    if (!s->classify() && end == s->total()) {
      ss.output_rows.push_back(take - 1);
      ss.sampling = s->sampling;
      ss.sampling.counter = s->generated.size();
    }
    plan.sequences.push_back(std::move(ss));
    batch.push_back(s);
    budget -= take;
  }
  // Preempted sequences go back to the front of the queue, oldest first.
  for (auto it = running_.rbegin(); it != running_.rend();) {
    if ((*it)->state == SeqState::kWaiting) {
      waiting_.push_front(std::move(*it));
      it = std::make_reverse_iterator(running_.erase(std::next(it).base()));
    } else {
      ++it;
    }
  }
}

Status Scheduler::Advance() {
  // With a pipeline, each step takes an equal share of the sequences not yet in flight, so every
  // stage has a step to work on; without one (depth 1) a step takes them all.
  const int depth = std::max(1, executor_.pipeline_depth());
  while (static_cast<int>(in_flight_.size()) < depth) {
    size_t ready = 0;
    for (const auto& s : running_) ready += s->state == SeqState::kRunning ? 1 : 0;
    const size_t slots = static_cast<size_t>(depth) - in_flight_.size();
    InFlightStep f;
    const auto scheduling = Clock::now();
    Schedule(f.batch, f.plan, (ready + slots - 1) / slots);
    if (f.plan.sequences.empty()) break;
    const ModelConfig& c = executor_.config();
    f.plan.ids_only = !c.is_classifier();
    for (size_t m = 0; m < f.batch.size(); ++m) {
      const Sequence& s = *f.batch[m];
      const StepSequence& ss = f.plan.sequences[m];
      const bool prompt_rows = std::any_of(ss.output_rows.begin(), ss.output_rows.end(),
                                           [&](int64_t r) { return s.prompt_row(ss.start_pos + r); });
      if (!ss.output_rows.empty() && !s.classify() && (s.gen().needs_logits() || prompt_rows)) {
        f.plan.ids_only = false;
      }
    }
    if (f.plan.ids_only) AttachTokenMasks(f);
    // A prefix copy travels with its sequence's first step (later steps check its length).
    for (auto it = pending_copies_.begin(); it != pending_copies_.end();) {
      const bool mine = std::any_of(f.batch.begin(), f.batch.end(), [&](const Sequence* s) {
        return s->engine_id == it->second.dst;
      });
      if (!mine) {
        ++it;
        continue;
      }
      f.plan.kv_copies.push_back(it->second);
      f.pinned.push_back(it->first);
      it = pending_copies_.erase(it);
    }
    const auto submitting = Clock::now();
    Status submitted = executor_.Submit(f.plan);
    f.submitted = Clock::now();
    f.number = ++steps_submitted_;
    Trace("schedule", scheduling, submitting, 0, f);
    Trace("submit", submitting, f.submitted, 0, f);
    if (!submitted.ok()) {
      for (int64_t entry : f.pinned) cache_.Unpin(entry);
      if (!executor_.health().ok()) return submitted;
      FailRefused(f, submitted);  // refused before any rank ran it: those requests only
      continue;
    }
    for (Sequence* s : f.batch) Enter(*s, SeqState::kInFlight);
    in_flight_.push_back(std::move(f));
  }
  if (in_flight_.empty()) return OkStatus();
  InFlightStep f = std::move(in_flight_.front());
  in_flight_.pop_front();
  auto stepped = executor_.Collect();
  const auto collected = Clock::now();
  const int lane = 1 + static_cast<int>(f.number % std::max(1, depth));
  Trace("step", f.submitted, collected, lane, f);
  if (stepped.ok() && stepped->rank_us > 0) {  // the slowest rank's own time, ending at its answer
    Trace("ranks", collected - std::chrono::microseconds(stepped->rank_us), collected, lane, f);
  }
  for (int64_t entry : f.pinned) cache_.Unpin(entry);
  for (Sequence* s : f.batch) Enter(*s, SeqState::kRunning);
  if (!stepped.ok()) {
    if (!executor_.health().ok()) return stepped.status();
    FailRefused(f, stepped.status());
    return OkStatus();
  }
  Apply(f, *stepped);
  Sweep();
  Trace("apply", collected, Clock::now(), 0, f);
  return OkStatus();
}

// Structured output on the ids-only path: each constrained row's mask goes to the ranks with the
// step, so only the ids come back; rows in the same place of the same grammar share one (found by
// their states, before any mask is copied). (A step that returns rows is masked here instead, in
// AcceptToken.)
void Scheduler::AttachTokenMasks(InFlightStep& f) {
  const auto words = static_cast<size_t>(TokenMaskWordCount(executor_.config().vocab_size));
  std::vector<std::pair<const ConstraintState*, int32_t>> placed;  // a place -> its mask
  for (size_t m = 0; m < f.batch.size(); ++m) {
    Sequence& s = *f.batch[m];
    StepSequence& ss = f.plan.sequences[m];
    if (!s.structure || ss.output_rows.empty()) continue;
    const auto same = std::find_if(placed.begin(), placed.end(),
                                   [&](const auto& p) { return p.first->SamePlace(*s.structure); });
    if (same != placed.end()) {
      ss.token_mask = same->second;
      continue;
    }
    s.structure->Allowed(mask_);
    TokenMaskWords& w = f.plan.token_masks.emplace_back(std::move(mask_.words));
    w.resize(words, 0);
    ss.token_mask = static_cast<int32_t>(f.plan.token_masks.size() - 1);
    placed.emplace_back(&*s.structure, ss.token_mask);
  }
}

void Scheduler::Trace(const char* name, Clock::time_point begin, Clock::time_point end, int lane,
                      const InFlightStep& f) {
  if (!opts_.trace) return;
  opts_.trace->Span(name, begin, end, lane, f.number, static_cast<int64_t>(f.plan.sequences.size()),
                    f.plan.total_tokens(), f.plan.total_outputs());
}

void Scheduler::FailRefused(const InFlightStep& f, const Status& why) {
  const ApiError e =
      ServerError(500, "the step of this request was refused: " + why.message(), "server_error");
  for (Sequence* s : f.batch) CloseRequest(*s->req, Outcome::kFailed, e);
  Sweep();
}

void Scheduler::Apply(InFlightStep& f, const StepOutput& out) {
  const StepPlan& plan = f.plan;
  const std::vector<Sequence*>& batch = f.batch;
  metrics_.steps.fetch_add(1);
  int64_t row = 0;
  for (size_t m = 0; m < batch.size(); ++m) {
    Sequence& s = *batch[m];
    const StepSequence& ss = plan.sequences[m];
    const auto take = static_cast<int64_t>(ss.tokens.size());
    if (s.req->closed) {  // a sibling failed during this step
      row += static_cast<int64_t>(ss.output_rows.size());
      continue;
    }
    if (s.computed < static_cast<int64_t>(s.prompt.size())) {
      metrics_.prompt_tokens.fetch_add(static_cast<uint64_t>(
          std::min<int64_t>(take, static_cast<int64_t>(s.prompt.size()) - s.computed)));
    }
    s.computed += take;
    for (size_t k = 0; k < ss.output_rows.size(); ++k, ++row) {
      const int64_t position = ss.start_pos + ss.output_rows[k];
      if (s.classify()) {
        s.class_rows.emplace_back(out.row(row), out.row(row) + out.width);
      } else if (s.prompt_row(position)) {
        PromptRow(s, std::span<const float>(out.row(row), static_cast<size_t>(out.width)));
      } else {
        const int32_t tok = plan.ids_only ? out.ids[static_cast<size_t>(row)] : -1;
        AcceptToken(s, tok, out, row);
      }
    }
    if (s.classify() && s.computed == s.total()) Classified(s);
  }
}

// One prompt position's row: the next prompt token's log-probability; the prompt's list goes to
// the request once complete.
void Scheduler::PromptRow(Sequence& s, std::span<const float> row) {
  const auto next = s.prompt[s.prompt_lp.size() + 1];
  s.prompt_lp.push_back(Logprobs(row, next, s.prompt_top));
  if (s.prompt_lp.size() + 1 < s.prompt.size()) return;
  RequestHandle& h = *s.req->handle;
  MutexLock lock(h.mu);
  h.prompt_logprobs[static_cast<size_t>(s.index / std::max(1, s.gen().n))] = s.prompt_lp;
}

void Scheduler::AcceptToken(Sequence& s, int32_t tok, const StepOutput& out, int64_t row) {
  const GenerationOptions& g = s.gen();
  std::optional<TokenLogprobs> lp;
  if (tok < 0) {  // the row came back: penalties, min_p and log-probabilities happen here
    std::span<const float> raw(out.row(row), static_cast<size_t>(out.width));
    std::vector<float> v(raw.begin(), raw.end());
    if (s.structure) {  // first: every rule below then works on the allowed tokens alone
      s.structure->Allowed(mask_);
      const auto bits = static_cast<int64_t>(mask_.words.size()) * 64;
      for (int64_t t = 0; t < out.width; ++t) {
        if (t >= bits || !mask_.Test(static_cast<int32_t>(t))) v[static_cast<size_t>(t)] = -INFINITY;
      }
    }
    ApplyTokenRules(v, g, s.generated, executor_.config().eos_token_ids);
    ApplyPenalties(v, g, s.prompt, s.counts);
    if (!s.sampling.params.greedy) ApplyMinP(v, g.min_p, s.sampling.params.temperature);
    if (std::none_of(v.begin(), v.end(), [](float x) { return x > -INFINITY; })) {
      CloseRequest(*s.req, Outcome::kFailed,
                   ApiError{400,
                            "no token is left to draw: allowed_token_ids, bad_words, min_tokens, "
                            "logit_bias and the output's structure together exclude every token",
                            "invalid_request_error", "allowed_token_ids", ""});
      return;
    }
    RowSampling rs = s.sampling;
    rs.counter = s.generated.size();
    tok = SampleRow(v, rs);
    if (g.logprobs >= 0) lp = Logprobs(raw, tok, g.logprobs);
  }
  const auto now = Clock::now();
  if (!s.req->first_token) {
    s.req->first_token = true;
    s.req->first_token_at = now;
    metrics_.ttft.Observe(std::chrono::duration<double>(now - s.req->handle->arrival()).count());
  } else if (s.last_token != Clock::time_point{}) {
    metrics_.itl.Observe(std::chrono::duration<double>(now - s.last_token).count());
  }
  s.last_token = now;
  s.generated.push_back(tok);
  ++s.counts[tok];
  metrics_.generation_tokens.fetch_add(1);

  const ModelConfig& c = executor_.config();
  const bool stop_token =
      (Contains(c.eos_token_ids, tok) && !g.ignore_eos) || Contains(g.stop_token_ids, tok);
  TextOutput::Piece piece;
  std::string reason;
  nlohmann::json stop_reason;  // vLLM: the stop token id or string; null for EOS and length
  if (stop_token) {
    reason = "stop";  // the stop token's own text is not part of the answer
    if (Contains(g.stop_token_ids, tok)) stop_reason = tok;
  } else {
    auto p = s.text->Push(tok);
    if (!p.ok()) {
      CloseRequest(*s.req, Outcome::kFailed,
                   ServerError(500, p.status().message(), "server_error"));
      return;
    }
    piece = std::move(*p);
    if (piece.hit_stop) {
      reason = "stop";
      stop_reason = piece.stop;
    }
  }
  if (s.structure && !stop_token) {
    if (!s.structure->Advance(tok)) {
      CloseRequest(*s.req, Outcome::kFailed,
                   ServerError(500, "token " + std::to_string(tok) + " breaks the " +
                                        s.structure->constraint().kind + " structure it was drawn under",
                               "server_error"));
      return;
    }
    if (reason.empty() && s.structure->Finished()) reason = "stop";  // nothing may follow
  }
  if (reason.empty() && static_cast<int64_t>(s.generated.size()) >= g.max_tokens) reason = "length";
  if (!reason.empty() && !piece.hit_stop) {
    auto rest = s.text->Finish();
    if (rest.ok()) piece.text += *rest;
  }
  RequestHandle& h = *s.req->handle;
  {
    MutexLock lock(h.mu);
    ChoiceProgress& ch = h.choices[static_cast<size_t>(s.index)];
    if (!h.first_token_at) h.first_token_at = now;
    ch.token_ids.push_back(tok);
    if (lp) ch.logprobs.push_back(std::move(*lp));
    ch.text += piece.text;
    ++h.completion_tokens;
    if (!reason.empty()) {
      ch.finish_reason = reason;
      ch.stop_reason = stop_reason;
      (reason == "stop" ? metrics_.finished_stop : metrics_.finished_length).fetch_add(1);
      const ToolUse& tools = s.req->handle->request().tools;
      if (reason == "stop" && tools.parses()) {  // a reply that is calls ends as calls
        ch.tool_calls = ParseToolCalls(ch.text, tools.names);
        if (!ch.tool_calls.is_null()) ch.finish_reason = "tool_calls";
      }
    }
  }
  touched_.push_back(s.req->handle);
  if (!reason.empty()) Finish(s);
}

void Scheduler::Classified(Sequence& s) {
  RequestHandle& h = *s.req->handle;
  {
    MutexLock lock(h.mu);
    h.classified[static_cast<size_t>(s.index)].logits = std::move(s.class_rows);
  }
  touched_.push_back(s.req->handle);
  Finish(s);
}

void Scheduler::Finish(Sequence& s) {
  if (!Donate(s)) Remove(s);
  if (--s.req->remaining == 0) CloseRequest(*s.req, Outcome::kSuccess, std::nullopt);
}

void Scheduler::CloseRequest(Request& r, Outcome o, std::optional<ApiError> error) {
  if (r.closed) return;
  r.closed = true;
  if (!r.admitted) {
    r.admitted = true;
    --queued_requests_;
  }
  RequestHandle& h = *r.handle;
  {
    MutexLock lock(h.mu);
    if (error) h.error = std::move(error);
    h.done = true;
  }
  if (h.counted) metrics_.End(o);
  if (o == Outcome::kSuccess && h.request().endpoint != Endpoint::kClassify) ObservePhases(r);
  --open_requests_;
  touched_.push_back(r.handle);
  // Sibling sequences of a failed or cancelled request leave with it at the next Sweep.
}

void Scheduler::ObservePhases(const Request& r) {
  const auto now = Clock::now();
  const auto arrival = r.handle->arrival();
  const auto seconds = [](auto d) { return std::chrono::duration<double>(d).count(); };
  metrics_.e2e.Observe(seconds(now - arrival));
  if (r.admitted_at != Clock::time_point{}) {
    metrics_.queue_time.Observe(seconds(r.admitted_at - arrival));
    if (r.first_token_at != Clock::time_point{}) {
      metrics_.prefill_time.Observe(seconds(r.first_token_at - r.admitted_at));
      metrics_.decode_time.Observe(seconds(now - r.first_token_at));
    }
  }
  MutexLock lock(r.handle->mu);
  metrics_.prompt_tokens_per_request.Observe(static_cast<double>(r.handle->prompt_tokens));
  metrics_.generation_tokens_per_request.Observe(static_cast<double>(r.handle->completion_tokens));
}

void Scheduler::FailAll(const ApiError& e) {
  {
    MutexLock lock(mu_);
    while (!incoming_.empty()) {
      Expand(incoming_.front());
      incoming_.pop_front();
    }
  }
  std::vector<std::shared_ptr<Request>> reqs;
  for (auto& s : running_) reqs.push_back(s->req);
  for (auto& s : waiting_) reqs.push_back(s->req);
  for (auto& r : reqs) CloseRequest(*r, Outcome::kFailed, e);
  for (InFlightStep& f : in_flight_) {  // the executor is lost: their answers never come
    for (int64_t entry : f.pinned) cache_.Unpin(entry);
  }
  in_flight_.clear();
  running_.clear();
  for (const auto& [entry, copy] : pending_copies_) cache_.Unpin(entry);
  pending_copies_.clear();
  while (EvictCached()) {
  }
  waiting_.clear();
  NotifyTouched();
  PublishGauges();
}

// Each request updated since the last call hears about it once (a step can touch a request of
// many sequences many times).
void Scheduler::NotifyTouched() {
  std::sort(touched_.begin(), touched_.end());
  touched_.erase(std::unique(touched_.begin(), touched_.end()), touched_.end());
  for (auto& h : touched_) {
    if (h->notify) h->notify();
  }
  touched_.clear();
}

void Scheduler::PublishGauges() {
  metrics_.queue_depth.store(queued_requests_.load());
  metrics_.running.store(static_cast<int64_t>(running_.size()));
  metrics_.kv_blocks_used.store(blocks_.used() - cache_.blocks());
  metrics_.kv_blocks_cached.store(cache_.blocks());
  metrics_.kv_blocks_free.store(blocks_.free());
}

}  // namespace gemma2::serving
