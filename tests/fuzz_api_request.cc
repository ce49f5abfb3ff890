// libFuzzer targets for what a client sends the API. Built twice:
//  - fuzz_http_request (GEMMA2_FUZZ_HTTP): the bytes are one HTTP request, read as HttpServer reads
//    it (Beast's parser under its header and body limits), whose body goes on as below;
//  - fuzz_api_request: the bytes after the first are a request body: ParseJsonBody, then the
//    completions, chat or classify parser (the first byte picks, so every parser sees every body).
// Each step must return a value or an error: never crash, hang, read out of bounds or overflow
// (ASan + UBSan). Gemma's real vocabulary is used where GEMMA2_FUZZ_TOKENIZER names it (the tests
// point it at ../shared/tokenizers), so text prompts, the chat template and structured output's
// grammars (schemas, regular expressions, tools) are parsed too.
#include <boost/beast/http.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "serving/request_parser.h"

namespace {

namespace http = boost::beast::http;
using namespace gemma2;

struct Facts {
  ModelConfig lm, cls;
  std::unique_ptr<Tokenizer> tokenizer;
  serving::ModelFacts lm_facts, cls_facts;
};

Facts* facts = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  facts = new Facts();
  facts->lm = PresetConfig("2b").value();
  facts->lm.max_position_embeddings = 512;
  facts->cls = facts->lm;
  facts->cls.architecture = Architecture::kSequenceClassification;
  facts->cls.num_labels = 3;
  if (const char* path = std::getenv("GEMMA2_FUZZ_TOKENIZER")) {
    auto t = Tokenizer::Load(path);
    if (t.ok()) facts->tokenizer = std::move(t).value();
  }
  serving::Limits lim;
  lim.strict_fields = true;
  lim.max_body_bytes = 1 << 16;
  facts->lm_facts = {&facts->lm, facts->tokenizer.get(), "m", lim};
  if (facts->tokenizer) {  // structured output's grammars are compiled as the server does
    facts->lm_facts.constraints =
        std::make_shared<serving::ConstraintCache>(*facts->tokenizer, std::vector<int32_t>{1});
  }
  facts->cls_facts = {&facts->cls, facts->tokenizer.get(), "m", lim};
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t route = data[0];
  const std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string body(bytes);
#ifdef GEMMA2_FUZZ_HTTP
  // The HTTP framing, as HttpServer reads it; only a whole request's body goes on.
  http::request_parser<http::string_body> parser;
  parser.header_limit(64 * 1024);
  parser.body_limit(facts->lm_facts.limits.max_body_bytes);
  parser.eager(true);
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(bytes.data(), bytes.size()), ec);
  if (!ec && !parser.is_done()) parser.put_eof(ec);
  if (ec || !parser.is_done()) return 0;
  (void)parser.get()[http::field::authorization];
  (void)parser.get().target();
  body = parser.get().body();
#endif
  auto json = serving::ParseJsonBody(body, facts->lm_facts.limits.max_json_depth);
  if (auto* j = std::get_if<serving::RequestJson>(&json)) {
    switch (route % 3) {
      case 0:
        (void)serving::ParseCompletions(*j, facts->lm_facts);
        break;
      case 1:
        (void)serving::ParseChat(*j, facts->lm_facts);
        break;
      default:
        (void)serving::ParseClassify(*j, facts->cls_facts);
    }
  }
  return 0;
}
