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

console.log(JSON.stringify({ ok: true, completion: one.choices[0].text, chat: chat.choices[0].message.content, streamed }));
