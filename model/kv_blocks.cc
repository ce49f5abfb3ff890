#include "model/kv_blocks.h"

#include <algorithm>
#include <string>
#include <tuple>

#include "model/step.h"

namespace gemma2 {

KvLayout KvLayout::For(const ModelConfig& c, int64_t block_size) {
  KvLayout l;
  l.block_size = block_size;
  l.window = c.sliding_window;
  l.max_blocks = (c.max_position_embeddings + block_size - 1) / block_size;
  for (int64_t layer = 0; layer < c.num_layers; ++layer)
    l.present[static_cast<size_t>(GroupOf(c, layer))] = true;
  if (!l.present[static_cast<size_t>(KvGroup::kSliding)]) l.window = 0;
  return l;
}

std::pair<int64_t, int64_t> KvLayout::Held(KvGroup g, int64_t start, int64_t n) const {
  const int64_t end = BlocksOf(start + n);
  if (g == KvGroup::kFull || window == 0) return {0, end};
  // A query at `start` sees keys from start - window + 1; later queries see less far back.
  return {std::min(end, std::max<int64_t>(0, start - window + 1) / block_size), end};
}

int64_t KvLayout::BudgetFor(int64_t tokens, int64_t step_tokens) const {
  int64_t blocks = 0;
  if (present[static_cast<size_t>(KvGroup::kFull)]) blocks += BlocksOf(tokens);
  if (present[static_cast<size_t>(KvGroup::kSliding)]) {
    // Held(kSliding, start, n) spans the window and the step's n <= step_tokens new positions.
    const int64_t most = window > 0 ? BlocksOf(window - 1 + std::max<int64_t>(1, step_tokens)) + 1
                                    : BlocksOf(tokens);
    blocks += std::min(BlocksOf(tokens), most);
  }
  return blocks;
}

KvLayerSlots::KvLayerSlots(std::span<const KvGroup> layer_groups) {
  std::array<int64_t, kKvGroups> count{};
  for (KvGroup g : layer_groups) {
    group.push_back(g);
    slot.push_back(count[static_cast<size_t>(g)]++);
  }
  slots = std::max<int64_t>(1, *std::max_element(count.begin(), count.end()));
}

KvBlockTables::KvBlockTables(KvLayout layout, int64_t num_blocks)
    : layout_(layout),
      owner_(static_cast<size_t>(std::max<int64_t>(0, num_blocks)), -1),
      free_count_(static_cast<int64_t>(owner_.size())),
      in_stack_(owner_.size(), 1) {
  free_.reserve(owner_.size());
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

void KvBlockTables::Free(int32_t block) {
  owner_[static_cast<size_t>(block)] = -1;
  ++free_count_;
  if (!in_stack_[static_cast<size_t>(block)]) {
    in_stack_[static_cast<size_t>(block)] = 1;
    free_.push_back(block);
  }
}

Status KvBlockTables::Apply(std::span<const KvAssign> assigns) {
  for (const KvAssign& a : assigns) {
    // Only a refused assignment pays for its message (this runs every step on every rank).
    const auto refuse = [&a](const std::string& why) {
      return InvalidArgument("KV block assignment (sequence " + std::to_string(a.sequence_id) +
                             ", group " + std::to_string(a.group) + ", logical block " +
                             std::to_string(a.logical) + ", block " + std::to_string(a.physical) +
                             "): " + why);
    };
    if (a.group >= kKvGroups) return refuse("no such group");
    if (a.logical < 0 || a.logical >= layout_.max_blocks) {
      return refuse("logical block outside a sequence's " + std::to_string(layout_.max_blocks));
    }
    if (a.physical < -1 || a.physical >= num_blocks()) {
      return refuse("no such block (the cache has " + std::to_string(num_blocks()) + ")");
    }
    Tables& t = seqs_[a.sequence_id];
    std::vector<int32_t>& table = t[a.group];
    if (table.empty()) table.assign(static_cast<size_t>(layout_.max_blocks), -1);
    int32_t& slot = table[static_cast<size_t>(a.logical)];
    if (a.physical < 0) {
      if (slot < 0) return refuse("gives back a block it does not hold");
      Free(slot);
      slot = -1;
      continue;
    }
    if (slot >= 0) return refuse("already holds block " + std::to_string(slot));
    const int64_t holder = owner_[static_cast<size_t>(a.physical)];
    if (holder >= 0) {
      return refuse("the block is held by sequence " + std::to_string(holder));
    }
    owner_[static_cast<size_t>(a.physical)] = a.sequence_id;
    --free_count_;
    slot = a.physical;
  }
  return OkStatus();
}

void KvBlockTables::Release(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  for (auto& table : it->second) {
    for (int32_t b : table) {
      if (b >= 0) Free(b);
    }
  }
  seqs_.erase(it);
}

std::span<const int32_t> KvBlockTables::table(int64_t id, KvGroup g) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {};
  return it->second[static_cast<size_t>(g)];
}

int64_t KvBlockTables::CopyFloor(int64_t id) const {
  const std::span<const int32_t> t = table(id, KvGroup::kSliding);
  if (layout_.window == 0 || t.empty()) return 0;
  const auto first = std::find_if(t.begin(), t.end(), [](int32_t b) { return b >= 0; });
  if (first == t.end()) return 0;
  // The smallest `tokens` whose Held(kSliding, tokens, 0) starts at or after the first held block.
  const int64_t first_block = first - t.begin();
  return first_block == 0 ? 0 : first_block * layout_.block_size + layout_.window - 1;
}

Status KvBlockTables::CopyPairs(int64_t src, int64_t dst, int64_t tokens,
                                std::vector<int32_t>* from, std::vector<int32_t>* to) const {
  for (int g = 0; g < kKvGroups; ++g) {
    if (!layout_.present[static_cast<size_t>(g)]) continue;
    const auto [first, end] = layout_.Held(static_cast<KvGroup>(g), tokens, 0);
    const std::span<const int32_t> s = table(src, static_cast<KvGroup>(g));
    const std::span<const int32_t> d = table(dst, static_cast<KvGroup>(g));
    for (int64_t b = first; b < end; ++b) {
      const int32_t sb = b < static_cast<int64_t>(s.size()) ? s[static_cast<size_t>(b)] : -1;
      const int32_t db = b < static_cast<int64_t>(d.size()) ? d[static_cast<size_t>(b)] : -1;
      if (sb < 0 || db < 0) {
        return InvalidArgument("KV copy of " + std::to_string(tokens) +
                               " positions from sequence " + std::to_string(src) + " to " +
                               std::to_string(dst) + ": logical block " + std::to_string(b) +
                               " is not held by the " + (sb < 0 ? "source" : "destination"));
      }
      from->push_back(sb);
      to->push_back(db);
    }
  }
  return OkStatus();
}

Status KvBlockTables::Plan(const StepPlan& plan, std::vector<KvAssign>* assigns) {
  // What each touched sequence must hold after the plan: [first, end) per group.
  struct Need {
    int64_t id;
    int g;
    int64_t first, end;
  };
  std::vector<Need> needs;
  for (const KvCopy& c : plan.kv_copies) {
    if (c.tokens < CopyFloor(c.src)) {
      return InvalidArgument("KV copy of " + std::to_string(c.tokens) +
                             " positions from sequence " + std::to_string(c.src) +
                             ": its sliding window only holds prefixes of " +
                             std::to_string(CopyFloor(c.src)) + " positions or more");
    }
    for (int g = 0; g < kKvGroups; ++g) {
      if (!layout_.present[static_cast<size_t>(g)]) continue;
      const auto [first, end] = layout_.Held(static_cast<KvGroup>(g), c.tokens, 0);
      needs.push_back({c.dst, g, first, end});
    }
  }
  for (const StepSequence& s : plan.sequences) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    for (int g = 0; g < kKvGroups; ++g) {
      if (!layout_.present[static_cast<size_t>(g)]) continue;
      const auto [first, end] = layout_.Held(static_cast<KvGroup>(g), s.start_pos, n);
      if (end > layout_.max_blocks) {
        return InvalidArgument("sequence " + std::to_string(s.sequence_id) + " needs " +
                               std::to_string(end) + " KV blocks, past a sequence's " +
                               std::to_string(layout_.max_blocks));
      }
      needs.push_back({s.sequence_id, g, first, end});
    }
  }
  // Give-backs first (blocks below a range), then what is missing inside the ranges; a sequence
  // that appears twice (a copy, then its step) is handled by its later, larger range. `planned`
  // holds the entries this plan changed, over the tables as they are. What a sequence holds of a
  // group is one run of blocks (plans give back from its bottom and add at its top), so both
  // scans stop at the run's edge: a step costs the blocks it changes, not the sequence's length.
  std::vector<KvAssign> back, take;
  std::map<std::tuple<int64_t, int, int64_t>, bool> planned;  // (id, group, block) -> held
  for (const Need& n : needs) {
    const std::span<const int32_t> now = table(n.id, static_cast<KvGroup>(n.g));
    const auto held = [&](int64_t b) {
      const auto it = planned.find({n.id, n.g, b});
      if (it != planned.end()) return it->second;
      return b < static_cast<int64_t>(now.size()) && now[static_cast<size_t>(b)] >= 0;
    };
    for (int64_t b = n.first - 1; b >= 0 && held(b); --b) {
      back.push_back({n.id, static_cast<uint8_t>(n.g), static_cast<int32_t>(b), -1});
      planned[{n.id, n.g, b}] = false;
    }
    for (int64_t b = n.end - 1; b >= n.first && !held(b); --b) {
      take.push_back({n.id, static_cast<uint8_t>(n.g), static_cast<int32_t>(b), 0});
      planned[{n.id, n.g, b}] = true;  // its block is taken below
    }
  }
  if (static_cast<int64_t>(take.size()) > free_count_ + static_cast<int64_t>(back.size())) {
    return Status(StatusCode::kUnavailable,
                  "KV cache full: the step needs " + std::to_string(take.size()) +
                      " more blocks of " + std::to_string(layout_.block_size) + " positions, " +
                      std::to_string(free_count_ + static_cast<int64_t>(back.size())) + " of " +
                      std::to_string(num_blocks()) + " are free");
  }
  RETURN_IF_ERROR(Apply(back).WithContext("KV plan (internal)"));
  for (KvAssign& a : take) {
    while (owner_[static_cast<size_t>(free_.back())] >= 0) {  // assigned since it was pushed
      in_stack_[static_cast<size_t>(free_.back())] = 0;
      free_.pop_back();
    }
    a.physical = free_.back();
    in_stack_[static_cast<size_t>(a.physical)] = 0;
    free_.pop_back();
  }
  RETURN_IF_ERROR(Apply(take).WithContext("KV plan (internal)"));
  assigns->insert(assigns->end(), back.begin(), back.end());
  assigns->insert(assigns->end(), take.begin(), take.end());
  return OkStatus();
}

}  // namespace gemma2
