#include "rpc/wire.h"

#include <cmath>
#include <cstring>

namespace gemma2::rpc {
namespace {

uint32_t LoadU32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

bool KnownType(uint16_t t) { return t >= 1 && t <= 12; }

}  // namespace

Result<FrameHeader> ParseHeader(std::span<const uint8_t> b) {
  if (b.size() < kHeaderBytes) return InvalidArgument("control frame shorter than its header");
  if (LoadU32(b.data()) != kMagic) return InvalidArgument("control frame: bad magic");
  const uint16_t version = static_cast<uint16_t>(b[4] | b[5] << 8);
  if (version != kVersion) {
    return InvalidArgument("control frame: version " + std::to_string(version) + ", expected " +
                           std::to_string(kVersion));
  }
  const uint16_t type = static_cast<uint16_t>(b[6] | b[7] << 8);
  if (!KnownType(type))
    return InvalidArgument("control frame: unknown type " + std::to_string(type));
  const uint32_t len = LoadU32(b.data() + 8);
  if (len > kMaxPayload) {
    return InvalidArgument("control frame: payload of " + std::to_string(len) + " bytes exceeds " +
                           std::to_string(kMaxPayload));
  }
  return FrameHeader{static_cast<MessageType>(type), len};
}

std::vector<uint8_t> Frame(MessageType type, std::span<const uint8_t> payload) {
  Writer w;
  w.U32(kMagic);
  w.U8(kVersion & 0xff);
  w.U8(kVersion >> 8);
  w.U8(static_cast<uint16_t>(type) & 0xff);
  w.U8(static_cast<uint16_t>(type) >> 8);
  w.U32(static_cast<uint32_t>(payload.size()));
  w.out().insert(w.out().end(), payload.begin(), payload.end());
  return std::move(w.out());
}

void Writer::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void Writer::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void Writer::F32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  U32(u);
}
void Writer::Bytes(std::span<const uint8_t> b) {
  U32(static_cast<uint32_t>(b.size()));
  out_.insert(out_.end(), b.begin(), b.end());
}

Status Reader::Need(size_t n) const {
  if (in_.size() - pos_ < n) return InvalidArgument("control message truncated");
  return OkStatus();
}
Status Reader::U8(uint8_t* v) {
  RETURN_IF_ERROR(Need(1));
  *v = in_[pos_++];
  return OkStatus();
}
Status Reader::U32(uint32_t* v) {
  RETURN_IF_ERROR(Need(4));
  *v = LoadU32(in_.data() + pos_);
  pos_ += 4;
  return OkStatus();
}
Status Reader::U64(uint64_t* v) {
  RETURN_IF_ERROR(Need(8));
  uint64_t r = 0;
  for (int i = 7; i >= 0; --i) r = r << 8 | in_[pos_ + static_cast<size_t>(i)];
  *v = r;
  pos_ += 8;
  return OkStatus();
}
Status Reader::I64(int64_t* v) {
  uint64_t u;
  RETURN_IF_ERROR(U64(&u));
  *v = static_cast<int64_t>(u);
  return OkStatus();
}
Status Reader::F32(float* v) {
  uint32_t u;
  RETURN_IF_ERROR(U32(&u));
  std::memcpy(v, &u, 4);
  return OkStatus();
}
Status Reader::Bytes(std::vector<uint8_t>* b, uint32_t max_len) {
  uint32_t n;
  RETURN_IF_ERROR(U32(&n));
  if (n > max_len)
    return InvalidArgument("control message: field of " + std::to_string(n) +
                           " bytes over its cap");
  RETURN_IF_ERROR(Need(n));
  b->assign(in_.begin() + static_cast<std::ptrdiff_t>(pos_),
            in_.begin() + static_cast<std::ptrdiff_t>(pos_ + n));
  pos_ += n;
  return OkStatus();
}
Status Reader::Count(uint32_t* n, uint32_t cap, size_t bytes_each, const char* what) {
  RETURN_IF_ERROR(U32(n));
  if (*n > cap || static_cast<uint64_t>(*n) * bytes_each > in_.size() - pos_) {
    return InvalidArgument(std::string(what) + " over the cap or past the payload");
  }
  return OkStatus();
}

Status Reader::Str(std::string* s, uint32_t max_len) {
  std::vector<uint8_t> b;
  RETURN_IF_ERROR(Bytes(&b, max_len));
  s->assign(b.begin(), b.end());
  return OkStatus();
}
Status Reader::Done() const {
  if (pos_ != in_.size()) return InvalidArgument("control message: trailing bytes");
  return OkStatus();
}

std::vector<uint8_t> EncodeStep(const StepPlan& plan) {
  Writer w;
  w.U8(plan.ids_only ? 1 : 0);
  w.U32(static_cast<uint32_t>(plan.released.size()));
  for (int64_t id : plan.released) w.I64(id);
  w.U32(static_cast<uint32_t>(plan.kv_copies.size()));
  for (const KvCopy& k : plan.kv_copies) {
    w.I64(k.src);
    w.I64(k.dst);
    w.I64(k.tokens);
  }
  w.U32(static_cast<uint32_t>(plan.kv_assign.size()));
  for (const KvAssign& a : plan.kv_assign) {
    w.I64(a.sequence_id);
    w.U8(a.group);
    w.U32(static_cast<uint32_t>(a.logical));
    w.U32(static_cast<uint32_t>(a.physical));
  }
  w.U32(static_cast<uint32_t>(plan.token_masks.size()));
  w.U32(plan.token_masks.empty() ? 0 : static_cast<uint32_t>(plan.token_masks[0].size()));
  for (const TokenMaskWords& m : plan.token_masks)
    for (uint64_t word : m) w.U64(word);
  w.U32(static_cast<uint32_t>(plan.sequences.size()));
  for (const StepSequence& s : plan.sequences) {
    w.I64(s.sequence_id);
    w.I64(s.start_pos);
    w.U32(static_cast<uint32_t>(s.tokens.size()));
    for (int32_t t : s.tokens) w.U32(static_cast<uint32_t>(t));
    w.U32(static_cast<uint32_t>(s.output_rows.size()));
    for (int64_t r : s.output_rows) w.I64(r);
    const SamplingParams& p = s.sampling.params;
    w.U8(p.greedy ? 1 : 0);
    w.F32(p.temperature);
    w.I64(p.top_k);
    w.F32(p.top_p);
    w.U64(p.seed);
    w.U64(s.sampling.counter);
    w.U32(static_cast<uint32_t>(s.token_mask));  // -1: 0xffffffff
  }
  return std::move(w.out());
}

Result<StepPlan> DecodeStep(std::span<const uint8_t> payload) {
  Reader r(payload);
  StepPlan plan;
  uint8_t flag;
  RETURN_IF_ERROR(r.U8(&flag));
  if (flag > 1) return InvalidArgument("step plan: bad ids_only flag");
  plan.ids_only = flag == 1;
  uint32_t nr;
  RETURN_IF_ERROR(r.Count(&nr, kMaxSequencesPerStep * 16u, 8, "step plan: released list"));
  plan.released.resize(nr);
  for (auto& id : plan.released) RETURN_IF_ERROR(r.I64(&id));
  uint32_t nc;
  RETURN_IF_ERROR(r.Count(&nc, kMaxSequencesPerStep, 24, "step plan: KV copy list"));
  plan.kv_copies.resize(nc);
  for (auto& k : plan.kv_copies) {
    RETURN_IF_ERROR(r.I64(&k.src));
    RETURN_IF_ERROR(r.I64(&k.dst));
    RETURN_IF_ERROR(r.I64(&k.tokens));
    if (k.tokens <= 0) return InvalidArgument("step plan: KV copy of no tokens");
  }
  uint32_t na;
  RETURN_IF_ERROR(r.Count(&na, kMaxTokensPerStep, 17, "step plan: KV block assignments"));
  plan.kv_assign.resize(na);
  for (auto& a : plan.kv_assign) {
    uint32_t logical, physical;
    RETURN_IF_ERROR(r.I64(&a.sequence_id));
    RETURN_IF_ERROR(r.U8(&a.group));
    RETURN_IF_ERROR(r.U32(&logical));
    RETURN_IF_ERROR(r.U32(&physical));
    a.logical = static_cast<int32_t>(logical);
    a.physical = static_cast<int32_t>(physical);  // ranges: KvBlockTables::Apply
  }
  uint32_t nm, words;
  RETURN_IF_ERROR(r.Count(&nm, kMaxSequencesPerStep, 8, "step plan: token masks"));
  RETURN_IF_ERROR(r.U32(&words));
  // Every word takes 8 bytes: masks past what is left cannot be real (no allocation first).
  if (static_cast<uint64_t>(words) * 8 > payload.size() ||
      static_cast<uint64_t>(nm) * words * 8 > payload.size())
    return InvalidArgument("step plan: token masks past the payload");
  plan.token_masks.resize(nm);
  for (auto& m : plan.token_masks) {
    m.resize(words);
    for (auto& word : m) RETURN_IF_ERROR(r.U64(&word));
  }
  uint32_t n;
  RETURN_IF_ERROR(r.U32(&n));
  if (n > kMaxSequencesPerStep)
    return InvalidArgument("step plan: " + std::to_string(n) + " sequences over the cap");
  uint64_t total_tokens = 0;
  for (uint32_t i = 0; i < n; ++i) {
    StepSequence s;
    RETURN_IF_ERROR(r.I64(&s.sequence_id));
    RETURN_IF_ERROR(r.I64(&s.start_pos));
    if (s.start_pos < 0) return InvalidArgument("step plan: negative start position");
    uint32_t nt;
    RETURN_IF_ERROR(r.U32(&nt));
    total_tokens += nt;
    // Each token takes 4 bytes: a count past what is left cannot be real (no allocation first).
    if (total_tokens > kMaxTokensPerStep || static_cast<uint64_t>(nt) * 4 > payload.size()) {
      return InvalidArgument("step plan: token count over the cap or past the payload");
    }
    s.tokens.resize(nt);
    for (auto& t : s.tokens) {
      uint32_t u;
      RETURN_IF_ERROR(r.U32(&u));
      t = static_cast<int32_t>(u);
    }
    uint32_t no;
    RETURN_IF_ERROR(r.U32(&no));
    if (no > nt) return InvalidArgument("step plan: more output rows than tokens");
    s.output_rows.resize(no);
    for (auto& o : s.output_rows) {
      RETURN_IF_ERROR(r.I64(&o));
      if (o < 0 || o >= static_cast<int64_t>(nt))
        return InvalidArgument("step plan: output row out of range");
    }
    uint8_t greedy;
    RETURN_IF_ERROR(r.U8(&greedy));
    if (greedy > 1) return InvalidArgument("step plan: bad greedy flag");
    SamplingParams& p = s.sampling.params;
    p.greedy = greedy == 1;
    RETURN_IF_ERROR(r.F32(&p.temperature));
    RETURN_IF_ERROR(r.I64(&p.top_k));
    RETURN_IF_ERROR(r.F32(&p.top_p));
    RETURN_IF_ERROR(r.U64(&p.seed));
    RETURN_IF_ERROR(r.U64(&s.sampling.counter));
    uint32_t mask;
    RETURN_IF_ERROR(r.U32(&mask));
    s.token_mask = static_cast<int32_t>(mask);
    if (s.token_mask < -1 || s.token_mask >= static_cast<int32_t>(nm))
      return InvalidArgument("step plan: a sequence names a token mask that is not there");
    RETURN_IF_ERROR(p.Validate().WithContext("step plan"));
    plan.sequences.push_back(std::move(s));
  }
  RETURN_IF_ERROR(r.Done());
  return plan;
}

std::vector<uint8_t> EncodeStepOutput(const StepOutput& out) {
  Writer w;
  w.I64(out.rows);
  w.I64(out.width);
  w.U32(static_cast<uint32_t>(out.values.size()));
  for (float v : out.values) w.F32(v);
  w.U32(static_cast<uint32_t>(out.ids.size()));
  for (int32_t id : out.ids) w.U32(static_cast<uint32_t>(id));
  w.I64(out.rank_us);
  return std::move(w.out());
}

Result<StepOutput> DecodeStepOutput(std::span<const uint8_t> payload) {
  Reader r(payload);
  StepOutput out;
  RETURN_IF_ERROR(r.I64(&out.rows));
  RETURN_IF_ERROR(r.I64(&out.width));
  uint32_t nv, ni;
  RETURN_IF_ERROR(r.U32(&nv));
  if (static_cast<uint64_t>(nv) * 4 > payload.size() || out.rows < 0 || out.width < 0 ||
      (nv != 0 && static_cast<uint64_t>(out.rows) * static_cast<uint64_t>(out.width) != nv)) {
    return InvalidArgument("step result: values do not match rows x width");
  }
  out.values.resize(nv);
  for (float& v : out.values) RETURN_IF_ERROR(r.F32(&v));
  RETURN_IF_ERROR(r.U32(&ni));
  if (static_cast<uint64_t>(ni) * 4 > payload.size())
    return InvalidArgument("step result: too many ids");
  out.ids.resize(ni);
  for (int32_t& id : out.ids) {
    uint32_t u;
    RETURN_IF_ERROR(r.U32(&u));
    id = static_cast<int32_t>(u);
  }
  RETURN_IF_ERROR(r.I64(&out.rank_us));
  if (out.rank_us < 0 || out.rank_us > int64_t{86400} * 1000000)
    return InvalidArgument("step result: a rank time outside 0 .. one day");
  RETURN_IF_ERROR(r.Done());
  return out;
}

std::vector<uint8_t> EncodeKvCapacity(const KvCapacity& c) {
  Writer w;
  w.I64(c.blocks);
  w.I64(c.block_size);
  return std::move(w.out());
}

Result<KvCapacity> DecodeKvCapacity(std::span<const uint8_t> payload) {
  Reader r(payload);
  KvCapacity c;
  RETURN_IF_ERROR(r.I64(&c.blocks));
  RETURN_IF_ERROR(r.I64(&c.block_size));
  RETURN_IF_ERROR(r.Done());
  if (c.blocks < 0 || c.block_size < 1 || c.block_size > kMaxKvBlockSize)
    return InvalidArgument("bad KV cache size");
  return c;
}

std::vector<uint8_t> EncodeStatus(const Status& st) {
  Writer w;
  w.U8(static_cast<uint8_t>(st.code()));
  w.Str(st.message());
  return std::move(w.out());
}

Status DecodeStatus(std::span<const uint8_t> payload, Status* out) {
  Reader r(payload);
  uint8_t code;
  std::string msg;
  RETURN_IF_ERROR(r.U8(&code));
  if (code > static_cast<uint8_t>(StatusCode::kDeadlineExceeded))
    return InvalidArgument("status: unknown code");
  RETURN_IF_ERROR(r.Str(&msg, 1u << 16));
  RETURN_IF_ERROR(r.Done());
  *out = Status(static_cast<StatusCode>(code), msg);
  return OkStatus();
}

}  // namespace gemma2::rpc
