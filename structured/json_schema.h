// Grammars of structured output: any JSON value, a JSON Schema (the subset below), one of a list
// of strings, and a regular expression (a subset). JSON is written compact (no whitespace between
// tokens), numbers with at most 16 integer and 16 fraction digits and a 2-digit exponent (a double), so a
// model that knows nothing still reaches the end.
//
// JSON Schema keywords compiled: type (one or a list; "null" with others: nullable), properties,
// required, additionalProperties (false or absent: only the listed properties are written; an
// object schema without properties: any object), items, minItems, maxItems, enum, const, anyOf,
// oneOf (as anyOf: exclusivity is not enforced), minLength, maxLength, minimum and maximum (and
// their exclusive forms) for integers, $defs / definitions with $ref "#/$defs/NAME" (not
// recursive). Annotations are ignored (title, description, examples, default, $schema, $id,
// $comment). Anything else is an error naming the keyword.
//
// Regular expressions: literals, escapes (\d \w \s \D \W \S and escaped punctuation), classes
// [a-z0-9_] and [^...], '.', groups ( ) and (?: ), alternation |, quantifiers * + ? {n} {n,}
// {n,m}; ^ and $ only at the ends (the whole output matches anyway). No backreferences or
// lookaround.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.h"
#include "structured/grammar.h"

namespace gemma2::structured {

Result<std::shared_ptr<const Grammar>> JsonGrammar();
// Properties are written in the schema's order: parse it as ordered_json.
Result<std::shared_ptr<const Grammar>> JsonSchemaGrammar(const nlohmann::ordered_json& schema);
Result<std::shared_ptr<const Grammar>> ChoiceGrammar(const std::vector<std::string>& choices);
Result<std::shared_ptr<const Grammar>> RegexGrammar(const std::string& pattern);

// A function the model may call: its name and the JSON Schema of its arguments (null: any object).
struct ToolSchema {
  std::string name;
  nlohmann::ordered_json parameters;
};
// Calls written as {"name":NAME,"arguments":ARGS}, ARGS valid for that tool's parameters (each
// schema is its own root for $ref); `list`: a JSON list of one or more calls may come instead.
Result<std::shared_ptr<const Grammar>> ToolCallsGrammar(const std::vector<ToolSchema>& tools,
                                                        bool list);

}  // namespace gemma2::structured
