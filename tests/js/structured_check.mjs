// Structured output against a running gemma2 server whose model knows nothing (random weights):
// random JSON Schema documents from the supported subset (docs/api.md), each asked for greedy
// and sampled through chat (response_format) and completions (structured_outputs, guided_json);
// every answer that ends with finish_reason "stop" must parse and validate under ajv, a
// validator not written here; random regular expressions and choices must match.
// Usage: node structured_check.mjs BASE_URL API_KEY MODEL [SCHEMAS] [SEED]
// Prints one JSON line of counts; exits non-zero on the first broken expectation.
import assert from "node:assert/strict";
import Ajv from "ajv";

const [baseURL, apiKey, model, schemasArg = "200", seedArg = "1"] = process.argv.slice(2);
const schemas = Number(schemasArg);

// mulberry32: the same documents on every run of one seed.
let state = Number(seedArg) >>> 0;
function random() {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (lo, hi) => lo + Math.floor(random() * (hi - lo + 1));
const pick = (xs) => xs[int(0, xs.length - 1)];
const words = ["alpha", "beta", "gamma", "delta", "x y", "ä", "日本", "quote\"d", "back\\slash", ""];

// Strings and arrays are bounded: a model that knows nothing rarely closes an open string, and
// an answer cut at max_tokens ends with "length" (counted, not validated).
function primitive() {
  switch (pick(["string", "integer", "number", "boolean", "null", "enum", "const"])) {
    case "string": {
      const s = { type: "string" };
      const min = int(0, 3);
      if (random() < 0.5) s.minLength = min;
      s.maxLength = min + int(0, 8);
      return s;
    }
    case "integer": {
      const s = { type: "integer" };
      if (random() < 0.6) s.minimum = int(-50, 50);
      if (random() < 0.6) s.maximum = (s.minimum ?? -60) + int(0, 500);
      if (random() < 0.2) {
        s.exclusiveMinimum = s.minimum ?? 0;
        delete s.minimum;
        if (s.maximum !== undefined && s.maximum <= s.exclusiveMinimum + 1) s.maximum = s.exclusiveMinimum + 2;
      }
      return s;
    }
    case "number":
      return { type: "number" };
    case "boolean":
      return { type: "boolean" };
    case "null":
      return { type: "null" };
    case "enum":
      return { enum: [...new Set(Array.from({ length: int(1, 4) }, () => JSON.stringify(pick([pick(words), int(-9, 99), true, null, 2.5]))))].map((v) => JSON.parse(v)) };
    default:
      return { const: pick([pick(words), int(0, 9), false, { k: [1, "v"] }]) };
  }
}

function schema(depth, defs) {
  const kinds = depth >= 3 ? ["primitive"] : ["primitive", "primitive", "object", "array", "anyOf", "oneOf", "nullable", "ref"];
  switch (pick(kinds)) {
    case "object": {
      const properties = {};
      const n = int(0, 4);
      for (let i = 0; i < n; i++) properties[`p${i}_${pick(["id", "name", "n", "é"])}`] = schema(depth + 1, defs);
      const names = Object.keys(properties);
      return { type: "object", properties, required: names.filter(() => random() < 0.6), additionalProperties: false };
    }
    case "array": {
      const min = int(0, 2);
      return { type: "array", items: schema(depth + 1, defs), minItems: min, maxItems: min + int(0, 2) };
    }
    case "anyOf":
      return { anyOf: [schema(depth + 1, defs), schema(depth + 1, defs)] };
    case "oneOf": // branches of distinct types: valid for one only, as oneOf asks
      return { oneOf: [{ type: "boolean" }, { type: "string", maxLength: 4 }, { type: "integer", minimum: 0, maximum: 9 }] };
    case "nullable": {
      const s = primitive();
      if (s.type && s.type !== "null") s.type = [s.type, "null"];
      return s;
    }
    case "ref": {
      const name = `d${Object.keys(defs).length}`;
      defs[name] = null;  // reserved: a nested $ref takes the next name
      defs[name] = schema(depth + 1, defs);
      return { $ref: `#/$defs/${name}` };
    }
    default:
      return primitive();
  }
}

function document() {
  const defs = {};
  const properties = {};
  const n = int(1, 4);
  for (let i = 0; i < n; i++) properties[`f${i}`] = schema(1, defs);
  const s = { type: "object", properties, required: Object.keys(properties).filter(() => random() < 0.7), additionalProperties: false };
  if (Object.keys(defs).length) s.$defs = defs;
  return s;
}

const regexes = ["[a-z]{2,6}", "\\d{3}-\\d{4}", "(yes|no|maybe)", "[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5})?",
  "0x[0-9a-f]{1,8}", "(ab|cd)+e?", "[^\\s]{1,5}\\.txt", "\\w{1,4}@\\w{1,4}\\.(com|org)", "-?\\d{1,3}(\\.\\d{1,2})?"];

async function post(path, body) {
  const r = await fetch(`${baseURL}${path}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ model, ...body }),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `${path} ${JSON.stringify(body).slice(0, 400)} -> ${text}`);
  return JSON.parse(text);
}

const ajv = new Ajv({ strict: false });
const counts = { requests: 0, validated: 0, length: 0, regex: 0, choice: 0 };
const outputs = new Set();

async function checkSchema(k) {
  const s = document();
  const validate = ajv.compile(s);
  const sampling = k % 2 ? { temperature: 1.0, seed: k, top_p: 0.95 } : { temperature: 0 };
  const route = k % 3;
  const body =
    route === 0 ? { messages: [{ role: "user", content: `Fill this in (${k}).` }], max_tokens: 400,
                    response_format: { type: "json_schema", json_schema: { name: "doc", schema: s, strict: true } }, ...sampling }
    : route === 1 ? { prompt: `Record ${k}:`, max_tokens: 400, structured_outputs: { json: s }, ...sampling }
    : { prompt: `Record ${k}:`, max_tokens: 400, guided_json: JSON.stringify(s), ...sampling };
  const r = await post(route === 0 ? "/v1/chat/completions" : "/v1/completions", body);
  const choice = r.choices[0];
  const text = route === 0 ? choice.message.content : choice.text;
  counts.requests++;
  outputs.add(text);
  if (choice.finish_reason === "length") {
    counts.length++;
    return;
  }
  assert.equal(choice.finish_reason, "stop", text);
  let value;
  assert.doesNotThrow(() => { value = JSON.parse(text); }, `not JSON: ${text}\nschema ${JSON.stringify(s)}`);
  assert.ok(validate(value), `invalid: ${text}\nschema ${JSON.stringify(s)}\n${ajv.errorsText(validate.errors)}`);
  counts.validated++;
}

async function checkRegex(k) {
  const pattern = regexes[k % regexes.length];
  const r = await post("/v1/completions", { prompt: `Item ${k}`, max_tokens: 60, temperature: k % 2 ? 1 : 0, seed: k,
                                           ...(k % 4 < 2 ? { guided_regex: pattern } : { structured_outputs: { regex: pattern } }) });
  const c = r.choices[0];
  if (c.finish_reason === "length") return void counts.length++;
  assert.match(c.text, new RegExp(`^(?:${pattern})$`, "u"), `regex ${pattern}`);
  counts.regex++;
  outputs.add(c.text);
}

async function checkChoice(k) {
  const options = ["red", "green", "blue", "light blue", "日本"];
  const r = await post("/v1/chat/completions", { messages: [{ role: "user", content: `Colour ${k}?` }], max_tokens: 20,
                                                temperature: k % 2 ? 1 : 0, seed: k,
                                                ...(k % 4 < 2 ? { guided_choice: options } : { structured_outputs: { choice: options } }) });
  const c = r.choices[0];
  assert.equal(c.finish_reason, "stop");
  assert.ok(options.includes(c.message.content), c.message.content);
  counts.choice++;
}

// A few at a time, as clients send them.
const jobs = [];
for (let k = 0; k < schemas; k++) jobs.push(() => checkSchema(k));
for (let k = 0; k < 36; k++) jobs.push(() => checkRegex(k));
for (let k = 0; k < 12; k++) jobs.push(() => checkChoice(k));
let next = 0;
await Promise.all(Array.from({ length: 16 }, async () => {
  while (next < jobs.length) await jobs[next++]();
}));

// Most answers complete inside max_tokens, and the model's answers differ: the checks saw
// real variety, not one output again and again.
assert.ok(counts.length <= counts.requests / 10, `too many answers cut at max_tokens: ${JSON.stringify(counts)}`);
assert.ok(outputs.size > (counts.requests + counts.regex) / 2, `outputs hardly vary: ${outputs.size}`);
console.log(JSON.stringify({ ok: true, ...counts, distinct: outputs.size }));
