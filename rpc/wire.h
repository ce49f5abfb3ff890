// Control-plane messages: plain versioned structs with a fixed little-endian encoding and a size
// cap. No object deserialization: a frame is a header and fields read one by one with bounds
// checks; anything unexpected (magic, version, type, length, a field out of range) is an error
// and the connection is closed.
//
// Frame: magic "G2CP" | u16 version | u16 type | u32 payload length | payload.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/step.h"

namespace gemma2::rpc {

inline constexpr uint32_t kMagic = 0x50433247;  // "G2CP" little-endian
// 2: KV prefix copies; 3: the rendezvous store; 4: KV capacity; 5: KV block tables;
// 6: the bootstrap handshake (both ways) and kPart
inline constexpr uint16_t kVersion = 8;  // 8: step plans carry token masks
inline constexpr size_t kHeaderBytes = 12;
inline constexpr uint32_t kMaxPayload = 64u
                                        << 20;  // a step plan of 64 MiB is far past any real one

enum class MessageType : uint16_t {
  kHello = 1,       // server -> client: a fresh nonce to prove the cluster secret against
  kAuth = 2,        // client -> server: rank, HMAC-SHA256(secret, nonce || rank)
  kAuthOk = 3,      // server -> client
  kStep = 4,        // coordinator -> worker: a StepPlan
  kStepResult = 5,  // worker -> coordinator: token ids or output rows, or an error
  kHeartbeat = 6,
  kShutdown = 7,
  kError = 8,  // either way: a Status, then the sender closes
  // The collectives' rendezvous, served by the coordinator during startup (a key-value store):
  kStoreSet = 9,     // worker -> coordinator: key, value
  kStoreGet = 10,    // worker -> coordinator: key; answered once the key is set
  kStoreValue = 11,  // coordinator -> worker: key, value
  // A piece of a message larger than kMaxPayload: the pieces' payloads, in order, then the
  // frame that ends the message (its own type, the last piece of the payload). A receiver takes
  // pieces only up to the size it expects (Channel::ExpectUpTo).
  kPart = 12,
};

inline constexpr uint32_t kMaxStoreKey = 256;

struct FrameHeader {
  MessageType type;
  uint32_t payload_bytes;
};

// A whole frame as it arrived.
struct Received {
  MessageType type;
  std::vector<uint8_t> payload;
};

// Parses and checks the 12 header bytes (magic, version, known type, length <= kMaxPayload).
Result<FrameHeader> ParseHeader(std::span<const uint8_t> bytes);
// Header + payload in one buffer.
std::vector<uint8_t> Frame(MessageType type, std::span<const uint8_t> payload);

// Bounded readers and writers of little-endian fields.
class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(v); }
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F32(float v);
  void Bytes(std::span<const uint8_t> b);  // u32 length, then the bytes
  void Str(const std::string& s) { Bytes({reinterpret_cast<const uint8_t*>(s.data()), s.size()}); }
  std::vector<uint8_t>& out() { return out_; }

 private:
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  Status U8(uint8_t* v);
  Status U32(uint32_t* v);
  Status U64(uint64_t* v);
  Status I64(int64_t* v);
  Status F32(float* v);
  Status Bytes(std::vector<uint8_t>* b, uint32_t max_len);
  Status Str(std::string* s, uint32_t max_len);
  // A u32 element count, refused (before the caller allocates) over `cap` or when `n` elements of
  // `bytes_each` could not fit in what is left ("<what> over the cap or past the payload").
  Status Count(uint32_t* n, uint32_t cap, size_t bytes_each, const char* what);
  // The payload must be consumed exactly.
  Status Done() const;

 private:
  Status Need(size_t n) const;
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

// Caps a decoded plan must respect (a coordinator never sends more; a corrupt frame is refused).
inline constexpr uint32_t kMaxSequencesPerStep = 4096;
inline constexpr uint32_t kMaxTokensPerStep = 1u << 20;

std::vector<uint8_t> EncodeStep(const StepPlan& plan);
// Checks every count against the caps and the payload length before allocating.
Result<StepPlan> DecodeStep(std::span<const uint8_t> payload);

std::vector<uint8_t> EncodeStepOutput(const StepOutput& out);
Result<StepOutput> DecodeStepOutput(std::span<const uint8_t> payload);

// A KV pool's size: the coordinator's request (the store's "kv-cache" key; 0 blocks: what memory
// allows) and a worker's ready message (the blocks its pool got). Between steps a heartbeat
// carries nothing.
inline constexpr int64_t kMaxKvBlockSize = 1024;
struct KvCapacity {
  int64_t blocks = 0;
  int64_t block_size = 16;
};
std::vector<uint8_t> EncodeKvCapacity(const KvCapacity& c);
Result<KvCapacity> DecodeKvCapacity(std::span<const uint8_t> payload);

std::vector<uint8_t> EncodeStatus(const Status& st);
// The decoded Status goes to *out; the return value says whether the payload was well formed.
Status DecodeStatus(std::span<const uint8_t> payload, Status* out);

}  // namespace gemma2::rpc
