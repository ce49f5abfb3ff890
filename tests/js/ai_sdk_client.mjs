// The Vercel AI SDK (ai + @ai-sdk/openai-compatible) against a running gemma2 server, as its users
// call it. Usage: node ai_sdk_client.mjs BASE_URL API_KEY MODEL
// Prints one JSON line of what it saw; exits non-zero on the first broken expectation.
import assert from "node:assert/strict";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, jsonSchema, streamObject, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, apiKey, model] = process.argv.slice(2);
// Every request the SDK sends is kept, so the test can send the same body by hand.
const sent = [];
const recording = async (url, options) => {
  sent.push({ url: String(url), body: JSON.parse(options.body) });
  return fetch(url, options);
};
const gemma = createOpenAICompatible({ name: "gemma2", baseURL: `${baseURL}/v1`, apiKey, includeUsage: true, fetch: recording });
const settings = { maxOutputTokens: 10, temperature: 0, maxRetries: 0 };
const system = "Be brief.";
const messages = [{ role: "user", content: "What is tensor parallelism?" }];

// The SDK's last request sent again by hand: what the server answered it.
async function resend() {
  const { url, body } = sent.at(-1);
  const r = await fetch(url, {
    method: "POST",
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(r.status, 200);
  return r.json();
}

const chat = await generateText({ model: gemma(model), system, messages, ...settings });
const direct = await resend();
assert.equal(sent.at(-1).body.messages[0].role, "system");
assert.equal(chat.text, direct.choices[0].message.content);
assert.equal(chat.usage.outputTokens, direct.usage.completion_tokens);
assert.equal(chat.finishReason, "length");

const completion = await generateText({ model: gemma.completionModel(model), prompt: "Hello, my name is", ...settings });
// The SDK writes the prompt as a "user:/assistant:" transcript with a stop string.
assert.match(sent.at(-1).body.prompt, /Hello, my name is/);
const directCompletion = await resend();
assert.equal(completion.text, directCompletion.choices[0].text);

// Streaming: the deltas add up to the unstreamed text; usage arrives at the end.
const stream = streamText({ model: gemma(model), system, messages, ...settings });
let streamed = "";
for await (const delta of stream.textStream) streamed += delta;
assert.equal(streamed, chat.text);
assert.equal((await stream.usage).outputTokens, 10);
const cstream = streamText({ model: gemma.completionModel(model), prompt: "Hello, my name is", ...settings });
let cstreamed = "";
for await (const delta of cstream.textStream) cstreamed += delta;
assert.equal(cstreamed, completion.text);

// A batch, as SDK users send one: concurrent calls, each its own answer.
const prompts = ["The sea", "A cluster of GPUs", "Hello, my name is"];
const batch = await Promise.all(prompts.map((prompt) =>
  generateText({ model: gemma.completionModel(model), prompt, ...settings })));
assert.equal(batch[2].text, completion.text);
assert.equal(sent.length, 7);
assert.ok(new Set(batch.map((b) => b.text)).size > 1, "different prompts, different answers");

// Structured output: the SDK sends the schema as response_format (supportsStructuredOutputs, as
// for vLLM) and validates the answer itself; whole and streamed.
const structured = createOpenAICompatible({ name: "gemma2", baseURL: `${baseURL}/v1`, apiKey, supportsStructuredOutputs: true });
const person = z.object({ name: z.string().max(8), age: z.number().int().min(0).max(120) });
const shaped = { ...settings, maxOutputTokens: 80 };
const { object } = await generateObject({ model: structured(model), schema: person, prompt: "A person", ...shaped });
assert.ok(person.safeParse(object).success, JSON.stringify(object));
const streamedObject = streamObject({ model: structured(model), schema: person, prompt: "A person", ...shaped });
let partials = 0;
for await (const partial of streamedObject.partialObjectStream) partials += partial ? 1 : 0;
assert.ok(partials > 3, `the object arrives in pieces (${partials} partial objects)`);
assert.deepEqual(await streamedObject.object, object);

// Tools with toolChoice required: the call comes back with arguments the SDK parsed against
// the tool's schema.
const calls = await generateText({
  model: structured(model), prompt: "Weather in Oslo?", ...shaped, toolChoice: "required",
  tools: { get_weather: tool({ description: "Weather in a city", inputSchema: jsonSchema({
    type: "object", properties: { city: { type: "string", maxLength: 12 } }, required: ["city"], additionalProperties: false }) }) },
});
assert.equal(calls.finishReason, "tool-calls");
assert.equal(calls.toolCalls[0].toolName, "get_weather");
assert.equal(typeof calls.toolCalls[0].input.city, "string");

console.log(JSON.stringify({ ok: true, chat: chat.text, completion: completion.text, streamed, object, call: calls.toolCalls[0].input }));
