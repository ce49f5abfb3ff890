// LangChain JS (@langchain/openai) against a running gemma2 server, as its users call it.
// Usage: node langchain_client.mjs BASE_URL API_KEY MODEL
// Prints one JSON line of what it saw; exits non-zero on the first broken expectation.
import assert from "node:assert/strict";
import { ChatOpenAI, OpenAI } from "@langchain/openai";
import { z } from "zod";

const [baseURL, apiKey, model] = process.argv.slice(2);
const common = { model, apiKey, configuration: { baseURL: `${baseURL}/v1` }, temperature: 0, maxTokens: 10, maxRetries: 0 };
const chat = new ChatOpenAI(common);
const llm = new OpenAI(common);
const messages = [["system", "Be brief."], ["human", "What is tensor parallelism?"]];

async function raw(path, body) {
  const r = await fetch(`${baseURL}/v1/${path}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ model, temperature: 0, max_tokens: 10, ...body }),
  });
  assert.equal(r.status, 200);
  return r.json();
}

// Chat and completions: the text the server gives the same greedy request by hand.
const answer = await chat.invoke(messages);
const direct = await raw("chat/completions", {
  messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "What is tensor parallelism?" }],
});
assert.equal(answer.content, direct.choices[0].message.content);
assert.equal(answer.usage_metadata.output_tokens, direct.usage.completion_tokens);
assert.equal(answer.response_metadata.finish_reason, "length");
const completion = await llm.invoke("Hello, my name is");
assert.equal(completion, (await raw("completions", { prompt: "Hello, my name is" })).choices[0].text);

// Streaming: the chunks add up to the unstreamed text.
let streamed = "";
for await (const chunk of await chat.stream(messages)) streamed += chunk.content;
assert.equal(streamed, answer.content);
let cstreamed = "";
for await (const chunk of await llm.stream("Hello, my name is")) cstreamed += chunk;
assert.equal(cstreamed, completion);

// Batches: chat.batch runs them concurrently; llm.generate sends several prompts in one request.
const prompts = ["The sea", "A cluster of GPUs", "Hello, my name is"];
const answers = await chat.batch(prompts.map((p) => [["human", p]]));
assert.equal(answers.length, 3);
const generated = await llm.generate(prompts);
assert.equal(generated.generations.length, 3);
assert.equal(generated.generations[2][0].text, completion);
assert.ok(new Set(generated.generations.map((g) => g[0].text)).size > 1, "different prompts, different answers");

// Structured output in each of withStructuredOutput's methods: the answer parses into the schema
// (json mode promises JSON only, so its schema takes any object).
const shaped = new ChatOpenAI({ ...common, maxTokens: 80 });
const person = z.object({ name: z.string().max(8), age: z.number().int().min(0).max(120) });
for (const method of ["jsonSchema", "functionCalling"]) {
  const p = await shaped.withStructuredOutput(person, { method, name: "person" }).invoke("A person");
  assert.ok(person.safeParse(p).success, `${method}: ${JSON.stringify(p)}`);
}
// JSON mode leaves strings unbounded, which a model that knows nothing seldom closes: sampled
// answers are drawn until one ends inside the budget, and that one must parse.
let anyObject = null;
for (let seed = 1; seed <= 8 && anyObject === null; seed++) {
  const sampler = new ChatOpenAI({ ...common, temperature: 1, maxTokens: 400, modelKwargs: { seed } });
  const r = await sampler.withStructuredOutput(z.object({}).passthrough(), { method: "jsonMode", includeRaw: true }).invoke("JSON please");
  if (r.raw.response_metadata.finish_reason !== "stop") continue;
  assert.equal(typeof r.parsed, "object", r.raw.content);
  anyObject = r.parsed;
}
assert.ok(anyObject !== null, "no JSON-mode answer ended within 400 tokens in 8 draws");

// bindTools: the calls come back as LangChain's tool_calls, arguments parsed.
const weather = { type: "function", function: { name: "get_weather", description: "Weather in a city",
  parameters: { type: "object", properties: { city: { type: "string", maxLength: 12 } }, required: ["city"] } } };
const bound = shaped.bindTools([weather], { tool_choice: "required" });
const called = await bound.invoke("Weather in Oslo?");
assert.equal(called.tool_calls.length >= 1, true, JSON.stringify(called));
assert.equal(called.tool_calls[0].name, "get_weather");
assert.equal(typeof called.tool_calls[0].args.city, "string");

console.log(JSON.stringify({ ok: true, chat: answer.content, completion, streamed, tool: called.tool_calls[0] }));
