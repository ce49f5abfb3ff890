// OpenAI request bodies -> ParsedRequest, with every rejection an ApiError that names the field.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>

#include "model/config.h"
#include "model/tokenizer.h"
#include "serving/api.h"
#include "serving/output_constraints.h"

namespace gemma2::serving {

// What the parser checks requests against.
struct ModelFacts {
  const ModelConfig* config = nullptr;
  const Tokenizer* tokenizer = nullptr;  // null: only token-id prompts
  std::string served_name;               // the one model this server answers for
  Limits limits;
  std::string quantization = "none";     // the ranks' --quantization (reported by /v1/models)
  std::string kv_cache_dtype = "auto";   // the ranks' --kv-cache-dtype (reported by /v1/models)
  // Structured output's compiled grammars (null: no tokenizer, structured output refused).
  std::shared_ptr<ConstraintCache> constraints;
};

template <typename T>
using ApiResult = std::variant<T, ApiError>;

// A request body as parsed: objects keep their keys' order (a JSON Schema's properties are
// written in the order given).
using RequestJson = nlohmann::ordered_json;

// JSON text -> value: malformed or truncated text, invalid UTF-8 and nesting deeper than
// `max_depth` are each a 400 naming the problem.
ApiResult<RequestJson> ParseJsonBody(std::string_view body, int max_depth);

ApiResult<ParsedRequest> ParseCompletions(const RequestJson& body, const ModelFacts& facts);
ApiResult<ParsedRequest> ParseChat(const RequestJson& body, const ModelFacts& facts);
ApiResult<ParsedRequest> ParseClassify(const RequestJson& body, const ModelFacts& facts);
// vLLM's POST /tokenize ({prompt, add_special_tokens} or {messages, add_generation_prompt}) and
// /detokenize ({tokens}): their whole answers, {count, max_model_len, tokens} and {prompt}.
ApiResult<nlohmann::json> ParseTokenize(const RequestJson& body, const ModelFacts& facts);
ApiResult<nlohmann::json> ParseDetokenize(const RequestJson& body, const ModelFacts& facts);

}  // namespace gemma2::serving
