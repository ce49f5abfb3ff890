#include "serving/responses.h"

#include <algorithm>
#include <cmath>

namespace gemma2::serving {
namespace {

using nlohmann::json;

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// A token as logprobs name it: its text, special tokens as their pieces ("<eos>").
std::string TokenText(const ResponseContext& ctx, int32_t id) {
  if (ctx.tokenizer) {
    auto t = ctx.tokenizer->Decode({id}, /*skip_special=*/false);
    if (t.ok() && !t->empty()) return *t;
  }
  return "token_id:" + std::to_string(id);
}

// Bytes a token adds to the choice's text (special tokens add none unless they are shown).
size_t TextBytes(const ResponseContext& ctx, int32_t id, bool skip_special) {
  if (!ctx.tokenizer) return 0;
  auto t = ctx.tokenizer->Decode({id}, skip_special);
  return t.ok() ? t->size() : 0;
}

json Usage(const RequestHandle& h) REQUIRES(h.mu) {
  return {{"prompt_tokens", h.prompt_tokens},
          {"completion_tokens", h.completion_tokens},
          {"total_tokens", h.prompt_tokens + h.completion_tokens}};
}

json NullOr(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

std::vector<int> Bytes(const std::string& s) {
  std::vector<int> b;
  for (unsigned char c : s) b.push_back(c);
  return b;
}

size_t PromptOf(const RequestHandle& h, size_t choice) REQUIRES(h.mu) {
  return choice / static_cast<size_t>(std::max(1, h.request().gen.n));
}

// Legacy completions logprobs for tokens [from, to) of a choice; text offsets from `offset`.
// With echo (unstreamed), the prompt's tokens come first: the first with null entries.
json CompletionLogprobs(const ResponseContext& ctx, const RequestHandle& h, size_t choice,
                        size_t from, size_t to, size_t offset) REQUIRES(h.mu) {
  const ChoiceProgress& ch = h.choices[choice];
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  const bool skip = h.request().gen.skip_special_tokens;
  if (h.request().echo_logprobs() && from == 0) {
    const size_t p = PromptOf(h, choice);
    const auto& prompt = h.request().prompts[p];
    const auto& rows = h.prompt_logprobs[p];
    for (size_t t = 0; t < prompt.size(); ++t) {
      tokens.push_back(TokenText(ctx, prompt[t]));
      offs.push_back(offset);
      offset += TextBytes(ctx, prompt[t], skip);
      if (t == 0 || t > rows.size()) {
        lps.push_back(nullptr);
        tops.push_back(nullptr);
        continue;
      }
      lps.push_back(rows[t - 1].chosen);
      json top = json::object();
      for (const auto& [id, lp] : rows[t - 1].top) top[TokenText(ctx, id)] = lp;
      tops.push_back(top);
    }
  }
  for (size_t i = from; i < to && i < ch.logprobs.size(); ++i) {
    const std::string t = TokenText(ctx, ch.token_ids[i]);
    tokens.push_back(t);
    lps.push_back(ch.logprobs[i].chosen);
    json top = json::object();
    for (const auto& [id, lp] : ch.logprobs[i].top) top[TokenText(ctx, id)] = lp;
    tops.push_back(top);
    offs.push_back(offset);
    offset += TextBytes(ctx, ch.token_ids[i], skip);
  }
  return {
      {"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json ChatLogprobs(const ResponseContext& ctx, const ChoiceProgress& ch, size_t from, size_t to) {
  json content = json::array();
  for (size_t i = from; i < to && i < ch.logprobs.size(); ++i) {
    const std::string t = TokenText(ctx, ch.token_ids[i]);
    json top = json::array();
    for (const auto& [id, lp] : ch.logprobs[i].top) {
      const std::string tt = TokenText(ctx, id);
      top.push_back({{"token", tt}, {"logprob", lp}, {"bytes", Bytes(tt)}});
    }
    content.push_back({{"token", t},
                       {"logprob", ch.logprobs[i].chosen},
                       {"bytes", Bytes(t)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

// vLLM's prompt_logprobs: null for the first token, then {id: {logprob, rank, decoded_token}}
// with the top k and the prompt's own token.
json PromptLogprobs(const ResponseContext& ctx, const RequestHandle& h, size_t prompt) REQUIRES(h.mu) {
  if (h.request().gen.prompt_logprobs < 0) return nullptr;
  const auto& ids = h.request().prompts[prompt];
  const auto& rows = h.prompt_logprobs[prompt];
  json out = json::array({nullptr});
  for (size_t t = 0; t < rows.size() && t + 1 < ids.size(); ++t) {
    json entry = json::object();
    const auto& top = rows[t].top;
    for (size_t r = 0; r < top.size() && r < static_cast<size_t>(h.request().gen.prompt_logprobs); ++r) {
      entry[std::to_string(top[r].first)] = {{"logprob", top[r].second},
                                             {"rank", r + 1},
                                             {"decoded_token", TokenText(ctx, top[r].first)}};
    }
    entry[std::to_string(ids[t + 1])] = {{"logprob", rows[t].chosen},
                                         {"rank", rows[t].rank},
                                         {"decoded_token", TokenText(ctx, ids[t + 1])}};
    out.push_back(std::move(entry));
  }
  return out;
}

// Tool calls: whether a chat choice's text so far may still turn out to be calls, so a stream
// keeps it back (a reply that is calls is sent as calls, never as text).
bool MayBeCalls(const ToolUse& tools, const std::string& text) {
  if (!tools.parses()) return false;
  if (tools.forced()) return true;
  const size_t first = text.find_first_not_of(" \t\r\n");
  return first == std::string::npos || text[first] == '{' || text[first] == '[';
}

// OpenAI's streamed calls: each with its index in the delta.
json CallDeltas(const json& calls) {
  json out = json::array();
  for (size_t k = 0; k < calls.size(); ++k) {
    json c = calls[k];
    c["index"] = k;
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace

json ErrorBody(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", NullOr(e.param)},
            {"code", NullOr(e.code)}}}};
}

// echo: the prompt as text (control tokens such as <bos> left out, as in any decoded text).
std::string EchoedPrompt(const ResponseContext& ctx, const RequestHandle& h, size_t choice) REQUIRES(h.mu) {
  if (!h.request().echo || !ctx.tokenizer) return "";
  auto text = ctx.tokenizer->Decode(h.request().prompts[PromptOf(h, choice)],
                                    h.request().gen.skip_special_tokens);
  return text.ok() ? *text : "";
}

json CompletionBody(const ResponseContext& ctx, const RequestHandle& h) {
  const GenerationOptions& g = h.request().gen;
  json choices = json::array();
  for (size_t i = 0; i < h.choices.size(); ++i) {
    const ChoiceProgress& ch = h.choices[i];
    json c = {{"index", i},
              {"text", EchoedPrompt(ctx, h, i) + ch.text},
              {"finish_reason", NullOr(ch.finish_reason)},
              {"stop_reason", ch.stop_reason},
              {"logprobs", g.logprobs >= 0 ? CompletionLogprobs(ctx, h, i, 0, ch.token_ids.size(), 0)
                                           : json(nullptr)}};
    if (g.prompt_logprobs >= 0) c["prompt_logprobs"] = PromptLogprobs(ctx, h, PromptOf(h, i));
    if (g.return_token_ids) {
      c["prompt_token_ids"] = h.request().prompts[PromptOf(h, i)];
      c["token_ids"] = ch.token_ids;
    }
    choices.push_back(std::move(c));
  }
  return {{"id", ctx.id},       {"object", "text_completion"}, {"created", ctx.created},
          {"model", ctx.model}, {"choices", choices},          {"usage", Usage(h)}};
}

json ChatBody(const ResponseContext& ctx, const RequestHandle& h) {
  const ParsedRequest& r = h.request();
  json choices = json::array();
  for (size_t i = 0; i < h.choices.size(); ++i) {
    const ChoiceProgress& ch = h.choices[i];
    json message = {{"role", "assistant"}, {"content", ch.text}};
    if (!ch.tool_calls.is_null()) {
      message["content"] = nullptr;  // as OpenAI: a reply of calls has no content
      message["tool_calls"] = ch.tool_calls;
    }
    json c = {{"index", i},
              {"message", std::move(message)},
              {"finish_reason", NullOr(ch.finish_reason)},
              {"stop_reason", ch.stop_reason},
              {"logprobs",
               r.chat_logprobs ? ChatLogprobs(ctx, ch, 0, ch.token_ids.size()) : json(nullptr)}};
    if (r.gen.return_token_ids) {
      c["prompt_token_ids"] = r.prompts[0];
      c["token_ids"] = ch.token_ids;
    }
    choices.push_back(std::move(c));
  }
  json body = {{"id", ctx.id},       {"object", "chat.completion"}, {"created", ctx.created},
               {"model", ctx.model}, {"choices", choices},          {"usage", Usage(h)}};
  if (r.gen.prompt_logprobs >= 0) body["prompt_logprobs"] = PromptLogprobs(ctx, h, 0);  // as vLLM
  return body;
}

json ClassifyBody(const ResponseContext& ctx, const RequestHandle& h) {
  const ModelConfig& c = *ctx.config;
  auto scored = [&](const std::vector<float>& logits) {
    const float best = *std::max_element(logits.begin(), logits.end());
    std::vector<double> probs;
    double sum = 0;
    for (float v : logits) sum += probs.emplace_back(std::exp(static_cast<double>(v - best)));
    for (double& p : probs) p /= sum;
    const auto arg =
        static_cast<size_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    return json{{"label", c.id2label[arg]}, {"probs", probs}, {"logits", logits}};
  };
  json data = json::array();
  for (size_t i = 0; i < h.classified.size(); ++i) {
    const auto& rows = h.classified[i].logits;
    json item = {{"index", i}, {"num_classes", c.num_labels}};
    if (c.architecture == Architecture::kSequenceClassification) {
      if (!rows.empty()) item.update(scored(rows[0]));
    } else {
      json tokens = json::array();
      const auto& ids = h.request().prompts[i];
      for (size_t t = 0; t < rows.size(); ++t) {
        json tok = scored(rows[t]);
        tok["token_id"] = ids[t];
        tokens.push_back(std::move(tok));
      }
      item["tokens"] = std::move(tokens);
    }
    data.push_back(std::move(item));
  }
  return {{"id", ctx.id},
          {"object", "list"},
          {"created", ctx.created},
          {"model", ctx.model},
          {"data", data},
          {"usage", {{"prompt_tokens", h.prompt_tokens}, {"total_tokens", h.prompt_tokens}}}};
}

std::string StreamEvents(const ResponseContext& ctx, const RequestHandle& h, StreamCursor& cur) {
  const ParsedRequest& r = h.request();
  const bool chat = r.endpoint == Endpoint::kChat;
  const size_t n = h.choices.size();
  cur.text_bytes.resize(n, 0);
  cur.tokens.resize(n, 0);
  cur.started.resize(n, false);
  cur.finished.resize(n, false);
  cur.calls.resize(n);
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    const ChoiceProgress& ch = h.choices[i];
    if (cur.finished[i]) continue;
    const bool fresh_text = ch.text.size() > cur.text_bytes[i];
    const bool fresh_tokens = ch.token_ids.size() > cur.tokens[i];
    const bool ending = !ch.finish_reason.empty();
    // A chat chunk of choice i with only a delta (no finish yet).
    auto delta_event = [&](json delta) {
      const json chunk = {{"id", ctx.id},
                          {"object", "chat.completion.chunk"},
                          {"created", ctx.created},
                          {"model", ctx.model},
                          {"choices",
                           {{{"index", i},
                             {"delta", std::move(delta)},
                             {"logprobs", nullptr},
                             {"finish_reason", nullptr}}}}};
      return "data: " + Dump(chunk) + "\n\n";
    };
    if (chat && !cur.started[i]) {  // OpenAI's first chat chunk carries the role
      out += delta_event({{"role", "assistant"}, {"content", ""}});
      cur.started[i] = true;
    }
    if (!fresh_text && !fresh_tokens && !ending) continue;
    // Calls the grammar forces are sent as they are written (OpenAI's deltas: the call with its
    // name, then its arguments in fragments); a reply that may be calls (tool_choice auto) is
    // kept back until it ends, then sent whole as calls or as text.
    ToolCallStream& calls = cur.calls[i];
    if (chat && r.tools.forced() && !calls.broken()) {
      const json deltas = calls.Feed(ch.text);
      if (!deltas.empty()) out += delta_event({{"tool_calls", deltas}});
    }
    if (chat && !ending && MayBeCalls(r.tools, ch.text)) continue;
    std::string delta = ch.text.substr(cur.text_bytes[i]);
    if (chat && calls.started()) {
      delta.clear();                                // sent as calls (cut by max_tokens or not)
    } else if (chat && !ch.tool_calls.is_null()) {  // the calls, then the finishing chunk
      out += delta_event({{"tool_calls", CallDeltas(ch.tool_calls)}});
      delta.clear();
    }
    if (!chat && cur.tokens[i] == 0 && cur.text_bytes[i] == 0) delta = EchoedPrompt(ctx, h, i) + delta;
    json c = {
        {"index", i}, {"finish_reason", NullOr(ch.finish_reason)}, {"stop_reason", ch.stop_reason}};
    const bool want_lp = chat ? r.chat_logprobs : r.gen.logprobs >= 0;
    json lp = nullptr;
    if (want_lp && fresh_tokens) {
      lp = chat
               ? ChatLogprobs(ctx, ch, cur.tokens[i], ch.token_ids.size())
               : CompletionLogprobs(ctx, h, i, cur.tokens[i], ch.token_ids.size(),
                                    cur.text_bytes[i]);
    }
    c["logprobs"] = lp;
    if (chat) {
      c["delta"] = ending && delta.empty() ? json::object() : json{{"content", delta}};
    } else {
      c["text"] = delta;
    }
    if (r.gen.return_token_ids) {
      if (cur.tokens[i] == 0) c["prompt_token_ids"] = r.prompts[PromptOf(h, i)];
      c["token_ids"] = std::vector<int32_t>(
          ch.token_ids.begin() + static_cast<std::ptrdiff_t>(cur.tokens[i]), ch.token_ids.end());
    }
    json chunk = {{"id", ctx.id},
                  {"object", chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", ctx.created},
                  {"model", ctx.model},
                  {"choices", json::array({c})}};
    if (r.gen.continuous_usage) chunk["usage"] = Usage(h);  // the request's usage so far
    out += "data: " + Dump(chunk) + "\n\n";
    cur.text_bytes[i] = ch.text.size();
    cur.tokens[i] = ch.token_ids.size();
    cur.finished[i] = ending;
  }
  return out;
}

std::string UsageEvent(const ResponseContext& ctx, const RequestHandle& h) {
  const bool chat = h.request().endpoint == Endpoint::kChat;
  json chunk = {{"id", ctx.id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", ctx.created},
                {"model", ctx.model},
                {"choices", json::array()},
                {"usage", Usage(h)}};
  return "data: " + Dump(chunk) + "\n\n";
}

}  // namespace gemma2::serving
