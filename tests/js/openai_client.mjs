// The official openai npm package against a running gemma2 server, as an unmodified user would
// call it. Usage: node openai_client.mjs BASE_URL API_KEY MODEL
// Prints one JSON line of what it saw; exits non-zero on the first broken expectation.
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey, maxRetries: 0 });

const models = await client.models.list();
assert.ok(models.data.some((m) => m.id === model), "the served model is listed");

const one = await client.completions.create({ model, prompt: "Hello, my name is", max_tokens: 8, temperature: 0 });
assert.equal(one.object, "text_completion");
assert.equal(one.choices.length, 1);
assert.equal(typeof one.choices[0].text, "string");
assert.equal(one.usage.completion_tokens, 8);
assert.equal(one.choices[0].finish_reason, "length");

const batch = await client.completions.create({ model, prompt: ["The sea", "A cluster of GPUs"], max_tokens: 5, temperature: 0 });
assert.equal(batch.choices.length, 2);
assert.deepEqual(batch.choices.map((c) => c.index), [0, 1]);

const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "What is tensor parallelism?" }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0 });
assert.equal(chat.object, "chat.completion");
assert.equal(chat.choices[0].message.role, "assistant");

// Streamed text, concatenated, equals the same greedy request unstreamed.
const stream = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0, stream: true });
let streamed = "";
let finish = null;
for await (const chunk of stream) {
  for (const c of chunk.choices) {
    streamed += c.delta?.content ?? "";
    finish = c.finish_reason ?? finish;
  }
}
assert.equal(streamed, chat.choices[0].message.content);
assert.equal(finish, chat.choices[0].finish_reason);

const cstream = await client.completions.create({ model, prompt: "Hello, my name is", max_tokens: 8, temperature: 0, stream: true });
let ctext = "";
for await (const chunk of cstream) ctext += chunk.choices.map((c) => c.text).join("");
assert.equal(ctext, one.choices[0].text);

// Errors arrive as the SDK's typed errors with OpenAI's body.
await assert.rejects(
  client.completions.create({ model, prompt: "x", max_tokens: 5, temperature: -1 }),
  (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && /temperature/.test(e.message),
);
await assert.rejects(
  client.completions.create({ model: "no-such-model", prompt: "x", max_tokens: 5 }),
  (e) => e instanceof OpenAI.NotFoundError && e.status === 404,
);
const wrongKey = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: "wrong", maxRetries: 0 });
await assert.rejects(wrongKey.models.list(), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);

// Structured output: a JSON Schema the answer follows even though the model knows nothing.
const person = {
  type: "object",
  properties: { name: { type: "string", maxLength: 8 }, age: { type: "integer", minimum: 0, maximum: 120 } },
  required: ["name", "age"],
  additionalProperties: false,
};
const shaped = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "A person" }], max_tokens: 60, temperature: 0,
  response_format: { type: "json_schema", json_schema: { name: "person", schema: person, strict: true } },
});
const p = JSON.parse(shaped.choices[0].message.content);
assert.deepEqual(Object.keys(p), ["name", "age"]);  // in the schema's order
assert.ok(typeof p.name === "string" && p.name.length <= 8 && Number.isInteger(p.age) && p.age >= 0 && p.age <= 120);
// JSON mode leaves strings unbounded, which a model that knows nothing seldom closes: of 8
// sampled answers, those that end inside the budget must parse, and one must.
const anyJson = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "JSON please" }], max_tokens: 400, temperature: 1, seed: 3, n: 8,
  response_format: { type: "json_object" },
});
const ended = anyJson.choices.filter((c) => c.finish_reason === "stop");
assert.ok(ended.length > 0, "no JSON-mode answer ended within 400 tokens in 8 draws");
for (const c of ended) assert.equal(typeof JSON.parse(c.message.content), "object");

// Tool calls: required and named choices answer with calls the SDK reads; the result goes back
// as a tool message and the conversation goes on.
const tools = [
  { type: "function", function: { name: "get_weather", description: "Weather in a city",
    parameters: { type: "object", properties: { city: { type: "string", maxLength: 12 }, unit: { enum: ["c", "f"] } }, required: ["city", "unit"] } } },
  { type: "function", function: { name: "get_time", parameters: { type: "object", properties: { zone: { type: "string", maxLength: 6 } }, required: ["zone"] } } },
];
const ask = [{ role: "user", content: "What is the weather in Oslo?" }];
const required = await client.chat.completions.create({ model, messages: ask, tools, tool_choice: "required", max_tokens: 80, temperature: 0 });
assert.equal(required.choices[0].finish_reason, "tool_calls");
const calls = required.choices[0].message.tool_calls;
assert.ok(calls.length >= 1 && calls.every((c) => c.type === "function" && /^call_/.test(c.id)));
assert.ok(calls.every((c) => ["get_weather", "get_time"].includes(c.function.name) && typeof JSON.parse(c.function.arguments) === "object"));
const named = await client.chat.completions.create({
  model, messages: ask, tools, tool_choice: { type: "function", function: { name: "get_weather" } }, max_tokens: 80, temperature: 0,
});
const call = named.choices[0].message.tool_calls[0];
assert.equal(named.choices[0].message.tool_calls.length, 1);
assert.equal(call.function.name, "get_weather");
const args = JSON.parse(call.function.arguments);
assert.ok(typeof args.city === "string" && ["c", "f"].includes(args.unit), call.function.arguments);
// Streamed, the call arrives as OpenAI sends one: a first delta with its id, type and name, then
// its arguments in fragments as they are written, which put together are the unstreamed ones.
const tstream = await client.chat.completions.create({
  model, messages: ask, tools, tool_choice: { type: "function", function: { name: "get_weather" } }, max_tokens: 80, temperature: 0, stream: true,
});
let streamedArgs = "";
let streamedName = "";
let tfinish = null;
const toolDeltas = [];
for await (const chunk of tstream) {
  for (const c of chunk.choices) {
    for (const d of c.delta?.tool_calls ?? []) {
      toolDeltas.push(d);
      streamedName += d.function?.name ?? "";
      streamedArgs += d.function?.arguments ?? "";
    }
    tfinish = c.finish_reason ?? tfinish;
  }
}
assert.equal(streamedName, "get_weather");
assert.ok(/^call_/.test(toolDeltas[0].id) && toolDeltas[0].type === "function" && toolDeltas[0].function.arguments === "");
assert.ok(toolDeltas.slice(1).every((d) => d.index === 0 && d.id === undefined));
assert.ok(toolDeltas.filter((d) => d.function?.arguments).length >= 2, "the arguments come in fragments");
assert.equal(streamedArgs, call.function.arguments);
assert.equal(tfinish, "tool_calls");
const followUp = await client.chat.completions.create({
  model, tools, max_tokens: 6, temperature: 0,
  messages: [...ask, named.choices[0].message, { role: "tool", tool_call_id: call.id, content: "12 degrees, clear" }],
});
assert.equal(typeof followUp.choices[0].message.content, "string");
assert.ok(followUp.usage.prompt_tokens > named.usage.prompt_tokens, "the call and its result are in the prompt");

console.log(JSON.stringify({ ok: true, completion: one.choices[0].text, chat: chat.choices[0].message.content, streamed, person: p, call: call.function }));
