// End-to-end test of `shardlm serve` with the official openai npm client (run by CTest, see
// tests/serve/CMakeLists.txt; the client comes from `npm ci` into the build tree).
//
// Starts the server on 127.0.0.1 with port 0 (the server picks a free port and prints it), waits for
// /health, and checks: completions and chat, whole and streamed; stop strings; a seeded sampled completion
// repeated; logprobs in both shapes; usage; /v1/models; /metrics; /tokenize and /detokenize; that greedy text
// equals `shardlm generate --json`; that bad requests get their 4xx and the server answers afterwards; then
// SIGTERM and exit status 0. Loopback only; bounded in time.
//
// Environment: SHARDLM_BIN (the shardlm binary), SHARDLM_MODEL (models/aidreams260K.gguf), SHARDLM_SERVE_TMP
// (a folder for the chat template file), SHARDLM_SERVE_EXTRA (more server flags).
import { execFile } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startServer } from './server.mjs';

const BIN = process.env.SHARDLM_BIN;
const MODEL = process.env.SHARDLM_MODEL;
const TMP = process.env.SHARDLM_SERVE_TMP || '.';
// More flags for the server, e.g. "--tp 2": the same checks on a split model (rank 0 serves, greedy text
// still equals the one-rank `generate`).
const EXTRA = (process.env.SHARDLM_SERVE_EXTRA || '').split(' ').filter((a) => a);
if (!BIN || !MODEL) {
  console.error('set SHARDLM_BIN and SHARDLM_MODEL');
  process.exit(2);
}
const KEY = 'test-key-123';
const NAME = 'tiny';
const MAX_BODY = 65536;
const PROMPT = 'Once upon a time';

// The whole test must end within this; the server is killed otherwise.
let server = null;  // the server process, killed by the deadline if it is still up
const deadline = setTimeout(() => {
  console.error('FAIL: the test took longer than 200 s');
  if (server) server.kill('SIGKILL');
  process.exit(1);
}, 200_000);

// ChatML: the bundled model has no chat template of its own.
const chatml =
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const templatePath = join(TMP, `chatml-${process.pid}.jinja`);
writeFileSync(templatePath, chatml);

const started = await startServer(BIN, ['-m', MODEL, '--served-model-name', NAME, '--chat-template', templatePath,
  '--api-key', KEY, '--max-num-seqs', '4', '--max-body-bytes', String(MAX_BODY), '-t', '1', '--shutdown-timeout', '20',
  ...EXTRA]);
server = started.proc;
const { base, exited } = started;
console.log(`server on ${base} ${EXTRA.join(' ')}`);

async function get(path, headers = {}) {
  const r = await fetch(base + path, { headers });
  return { status: r.status, text: await r.text(), type: r.headers.get('content-type') };
}
async function post(path, body, headers = { Authorization: `Bearer ${KEY}` }) {
  const r = await fetch(base + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, json, text };
}

// /health: 200 once the model is loaded (503 before).
for (let i = 0; ; ++i) {
  const h = await get('/health');
  if (h.status === 200) break;
  assert.equal(h.status, 503, `/health during loading: ${h.status}`);
  assert.ok(i < 100, '/health never became 200');
  await new Promise((r) => setTimeout(r, 100));
}

const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0, timeout: 30_000 });
let checks = 0;
async function check(name, fn) {
  await fn();
  ++checks;
  console.log(`ok - ${name}`);
}

function generateJson(prompt, n) {
  return new Promise((resolve, reject) => {
    execFile(BIN, ['generate', '-m', MODEL, '-p', prompt, '-n', String(n), '--greedy', '--json', '-t', '1', '-q'],
      { timeout: 60_000 }, (err, out, errOut) => {
        if (err) reject(new Error(`shardlm generate failed: ${err}\n${errOut}`));
        else resolve(JSON.parse(out));
      });
  });
}

let greedyText = '';
await check('/v1/models lists the served name', async () => {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  assert.equal(models.data[0].id, NAME);
  assert.equal(models.data[0].object, 'model');
});

await check('greedy completion equals `shardlm generate --json`, with usage', async () => {
  const gen = await generateJson(PROMPT, 40);
  const r = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 40, temperature: 0 });
  assert.equal(r.object, 'text_completion');
  assert.match(r.id, /^cmpl-/);
  assert.equal(r.choices.length, 1);
  greedyText = r.choices[0].text;
  assert.equal(greedyText, gen.text);
  assert.equal(r.usage.prompt_tokens, gen.prompt_ids.length);
  assert.equal(r.usage.completion_tokens, gen.generated_ids.length);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  assert.ok(['length', 'stop'].includes(r.choices[0].finish_reason));
  assert.equal(r.choices[0].finish_reason, gen.generated_ids.length === 40 ? 'length' : 'stop');
});

await check('streamed completion carries the same text, then usage', async () => {
  const stream = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 40, temperature: 0,
    stream: true, stream_options: { include_usage: true } });
  // The server sends what the engine has produced whenever its HTTP thread writes, so several tokens may share a
  // chunk (all 40 of them when the tiny model outruns the writer): at least one text chunk, then the usage chunk.
  let text = '', finish = null, usage = null, textChunks = 0, afterUsage = 0;
  for await (const c of stream) {
    assert.equal(c.object, 'text_completion');
    if (usage) ++afterUsage;
    if (c.choices.length) {
      ++textChunks;
      text += c.choices[0].text;
      if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    }
    if (c.usage) {
      assert.equal(c.choices.length, 0, 'the usage chunk carries no choices');
      usage = c.usage;
    }
  }
  assert.ok(textChunks >= 1, 'no text chunk');
  assert.equal(afterUsage, 0, 'chunks after the usage chunk');
  assert.equal(text, greedyText);
  assert.ok(finish);
  assert.ok(usage && usage.completion_tokens > 0 && usage.total_tokens === usage.prompt_tokens + usage.completion_tokens);
});

await check('stop strings end the text before them, streamed or not', async () => {
  assert.ok(greedyText.length > 12, greedyText);
  const stop = greedyText.slice(8, 11);
  const expect = greedyText.slice(0, greedyText.indexOf(stop));
  const r = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 40, temperature: 0,
    stop: ['@@@', stop] });
  assert.equal(r.choices[0].text, expect);
  assert.equal(r.choices[0].finish_reason, 'stop');
  const s = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 40, temperature: 0, stop,
    stream: true });
  let text = '', finish = null;
  for await (const c of s) {
    text += c.choices[0].text;
    if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
  }
  assert.equal(text, expect);
  assert.equal(finish, 'stop');
});

await check('a seeded sampled completion repeats', async () => {
  const req = { model: NAME, prompt: PROMPT, max_tokens: 24, temperature: 0.9, top_p: 0.95, seed: 1234,
    ignore_eos: true };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  assert.equal(a.choices[0].text, b.choices[0].text);
  assert.equal(a.usage.completion_tokens, 24);
});

await check('n = 3: seeded choices, each repeatable and equal to n = 1 with seed + index; usage sums', async () => {
  const req = { model: NAME, prompt: PROMPT, max_tokens: 10, temperature: 1, seed: 77, ignore_eos: true, n: 3 };
  const a = await client.completions.create(req);
  assert.equal(a.choices.length, 3);
  a.choices.forEach((c, i) => assert.equal(c.index, i));
  const b = await client.completions.create(req);
  assert.deepEqual(b.choices.map((c) => c.text), a.choices.map((c) => c.text));
  assert.ok(new Set(a.choices.map((c) => c.text)).size > 1, 'three sampled choices all alike: one seed for all?');
  for (let i = 0; i < 3; ++i) {
    const one = await client.completions.create({ ...req, n: 1, seed: 77 + i });
    assert.equal(one.choices[0].text, a.choices[i].text, `choice ${i}`);
  }
  assert.equal(a.usage.completion_tokens, 30);
  const t = await post('/tokenize', { prompt: PROMPT });
  assert.equal(a.usage.prompt_tokens, t.json.count);  // the prompt counted once
  assert.equal(a.usage.total_tokens, t.json.count + 30);
});

await check('n = 2 streamed: interleaved chunks by index, a finish per choice, one usage chunk', async () => {
  const messages = [{ role: 'user', content: 'Tell me a story.' }];
  const req = { model: NAME, messages, max_completion_tokens: 8, temperature: 1, seed: 5, ignore_eos: true, n: 2 };
  const whole = await client.chat.completions.create(req);
  assert.equal(whole.choices.length, 2);
  const stream = await client.chat.completions.create({ ...req, stream: true,
    stream_options: { include_usage: true } });
  const text = ['', ''], finish = [null, null];
  let usage = null, usageChunks = 0;
  for await (const c of stream) {
    if (!c.choices.length) { usage = c.usage; ++usageChunks; continue; }
    assert.equal(usage, null, 'a chunk after the usage chunk');
    const i = c.choices[0].index;
    assert.ok(i === 0 || i === 1, `index ${i}`);
    assert.equal(finish[i], null, `choice ${i} goes on after its finish_reason`);
    if (c.choices[0].delta.content) text[i] += c.choices[0].delta.content;
    if (c.choices[0].finish_reason) finish[i] = c.choices[0].finish_reason;
  }
  assert.equal(usageChunks, 1);
  assert.deepEqual(text, whole.choices.map((c) => c.message.content));
  assert.deepEqual(finish, ['length', 'length']);
  assert.equal(usage.completion_tokens, 16);
  assert.equal(usage.prompt_tokens, whole.usage.prompt_tokens);

  // The client's own accumulation of a streamed completion keeps the choices apart too.
  const cs = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 6, seed: 9, ignore_eos: true,
    n: 2, stream: true });
  const ctext = ['', ''];
  for await (const c of cs) ctext[c.choices[0].index] += c.choices[0].text;
  const cw = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 6, seed: 9, ignore_eos: true,
    n: 2 });
  assert.deepEqual(ctext, cw.choices.map((c) => c.text));
});

await check('completion logprobs: legacy shape', async () => {
  const r = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 6, temperature: 0, logprobs: 3,
    ignore_eos: true });
  const lp = r.choices[0].logprobs;
  for (const k of ['tokens', 'token_logprobs', 'top_logprobs', 'text_offset']) assert.equal(lp[k].length, 6, k);
  assert.equal(lp.tokens.join(''), r.choices[0].text);
  for (let i = 0; i < 6; ++i) {
    assert.ok(lp.token_logprobs[i] <= 0);
    const top = Object.values(lp.top_logprobs[i]);
    assert.ok(top.length >= 3 && top.length <= 4);
    // Greedy: the sampled token is the most likely one.
    assert.ok(Math.abs(Math.max(...top) - lp.token_logprobs[i]) < 1e-5);
    if (i > 0) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1]);
  }
});

await check('chat completion, whole and streamed, with logprobs', async () => {
  const messages = [{ role: 'system', content: 'You tell stories.' }, { role: 'user', content: 'Tell me one.' }];
  const r = await client.chat.completions.create({ model: NAME, messages, max_completion_tokens: 12, temperature: 0,
    logprobs: true, top_logprobs: 2 });
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(typeof r.choices[0].message.content, 'string');
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, r.usage.completion_tokens);
  for (const t of content) {
    assert.equal(typeof t.token, 'string');
    assert.ok(Array.isArray(t.bytes) && t.logprob <= 0);
    assert.equal(t.top_logprobs.length, 2);
    for (const x of t.top_logprobs) assert.ok(typeof x.token === 'string' && x.logprob <= 0 && Array.isArray(x.bytes));
  }
  const stream = await client.chat.completions.create({ model: NAME, messages, max_completion_tokens: 12,
    temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = '', first = null, finish = null, usage = null;
  for await (const c of stream) {
    assert.equal(c.object, 'chat.completion.chunk');
    if (c.usage) usage = c.usage;
    if (!c.choices.length) continue;
    if (first === null) first = c.choices[0].delta;
    if (c.choices[0].delta.content) text += c.choices[0].delta.content;
    if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
  }
  assert.equal(first.role, 'assistant');
  assert.equal(text, r.choices[0].message.content);
  assert.equal(finish, r.choices[0].finish_reason);
  // The same messages again: the prompt's full KV blocks (16 positions) come from the prefix cache.
  const { prompt_tokens_details: details, ...counts } = usage;
  const { prompt_tokens_details: first_details, ...first_counts } = r.usage;
  assert.deepEqual(counts, first_counts);
  assert.equal(details.cached_tokens, Math.floor((r.usage.prompt_tokens - 1) / 16) * 16);
  assert.ok(first_details.cached_tokens <= details.cached_tokens);
});

await check('/tokenize and /detokenize round trip', async () => {
  const t = await post('/tokenize', { prompt: PROMPT });
  assert.equal(t.status, 200);
  assert.ok(t.json.tokens.length > 2 && t.json.count === t.json.tokens.length);
  assert.equal(t.json.max_model_len, 128);
  const d = await post('/detokenize', { tokens: t.json.tokens });
  assert.equal(d.status, 200);
  assert.equal(d.json.prompt, PROMPT);
});

async function expectStillServing() {
  assert.equal((await get('/health')).status, 200);
  const r = await client.completions.create({ model: NAME, prompt: 'Hi', max_tokens: 2, temperature: 0 });
  assert.equal(r.choices.length, 1);
}

function expectError(r, status, param) {
  assert.equal(r.status, status, r.text);
  assert.ok(r.json && r.json.error, `no error object: ${r.text}`);
  assert.equal(typeof r.json.error.message, 'string');
  assert.equal(typeof r.json.error.type, 'string');
  assert.ok('param' in r.json.error && 'code' in r.json.error);
  if (param !== undefined) assert.equal(r.json.error.param, param);
}

await check('bad requests get their 4xx and the server still answers', async () => {
  expectError(await post('/v1/completions', '{"prompt": "x", '), 400);
  expectError(await post('/v1/completions', { prompt: 'x', max_tokens: 'ten' }), 400, 'max_tokens');
  expectError(await post('/v1/completions', { prompt: 7 }), 400, 'prompt');
  expectError(await post('/v1/completions', { prompt: 'x', temperature: 'hot' }), 400, 'temperature');
  expectError(await post('/v1/completions', { prompt: 'x', n: 5 }), 400, 'n');  // more than --max-num-seqs 4
  expectError(await post('/v1/completions', { prompt: 'x', n: 0 }), 400, 'n');
  expectError(await post('/v1/completions', { prompt: 'x', presence_penalty: 3 }), 400, 'presence_penalty');
  expectError(await post('/v1/completions', { prompt: 'x', model: 'gpt-4' }), 404, 'model');
  expectError(await post('/v1/completions', { prompt: 'word '.repeat(300) }), 400, 'prompt');
  expectError(await post('/v1/completions', { prompt: 'x', max_tokens: 500 }), 400, 'max_tokens');
  expectError(await post('/v1/chat/completions', { messages: [] }), 400, 'messages');
  expectError(await post('/v1/chat/completions', { messages: [{ role: 'user', content: 5 }] }), 400);
  expectError(await post('/v1/completions', { prompt: 'x' }, { Authorization: 'Bearer wrong' }), 401);
  expectError(await post('/v1/completions', { prompt: 'x' }, {}), 401);
  expectError(await post('/v1/completions', { prompt: 'x'.repeat(MAX_BODY + 10) }), 413);
  expectError(await post('/v1/nowhere', {}), 404);
  // Through the client: its typed errors.
  await assert.rejects(client.completions.create({ model: 'gpt-4', prompt: 'x' }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === 'model_not_found');
  await assert.rejects(client.completions.create({ model: NAME, prompt: 'x', n: 5 }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === 'n');
  await assert.rejects(client.chat.completions.create({ model: NAME, messages: [] }),
    (e) => e instanceof OpenAI.BadRequestError);
  await expectStillServing();
});

await check('a client that leaves mid-stream: its sequence ends, the server goes on', async () => {
  const ac = new AbortController();
  const stream = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 100, temperature: 0,
    ignore_eos: true, stream: true }, { signal: ac.signal });
  try {
    for await (const c of stream) { if (c.choices[0].text) { ac.abort(); } }
  } catch (e) {
    assert.ok(e instanceof OpenAI.APIUserAbortError || e.name === 'AbortError', String(e));
  }
  let m;
  for (let i = 0; ; ++i) {
    m = await get('/metrics');
    if (/shardlm:num_requests_running\{[^}]*\} 0\n/.test(m.text)) break;
    assert.ok(i < 100, 'the abandoned request still runs after 10 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  // The bundled model may well finish its 100 tokens before the abort arrives: then it counts as "length".
  const aborted = m.text.match(/finished_reason="abort"\} (\d+)/);
  console.log(`  (requests aborted so far: ${aborted ? aborted[1] : '?'})`);
  await expectStillServing();
});

await check('a client that leaves a non-streaming request: all its n sequences are aborted, blocks freed', async () => {
  const metric = (text, re) => Number((text.match(re) || [])[1]);
  const abortRe = /finished_reason="abort"\} (\d+)/;
  const abortsBefore = metric((await get('/metrics')).text, abortRe);
  // 4 x 110 tokens take a few hundred ms here; the server looks at the connection every 50 ms.
  const body = JSON.stringify({ model: NAME, prompt: PROMPT, max_tokens: 110, ignore_eos: true, n: 4 });
  const sock = connect(Number(new URL(base).port), '127.0.0.1');
  await new Promise((resolve, reject) => { sock.on('connect', resolve); sock.on('error', reject); });
  sock.write(`POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${KEY}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  await new Promise((r) => setTimeout(r, 20));
  sock.destroy();  // gone before the answer
  let m;
  for (let i = 0; ; ++i) {
    m = (await get('/metrics')).text;
    if (metric(m, /shardlm:num_requests_running\{[^}]*\} (\S+)/) === 0 &&
        metric(m, /shardlm:kv_cache_usage_perc\{[^}]*\} (\S+)/) === 0 && metric(m, abortRe) > abortsBefore) break;
    assert.ok(i < 100, `the abandoned request still runs, or was not aborted, after 10 s:\n${m}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(metric(m, abortRe) - abortsBefore, 4, 'all four choices aborted');
  await expectStillServing();
});

await check('/metrics: Prometheus text with the gauges, counters and histograms', async () => {
  const m = await get('/metrics');
  assert.equal(m.status, 200);
  assert.match(m.type, /^text\/plain/);
  const values = new Map();  // "name{labels}" -> number
  const types = new Map();
  for (const line of m.text.split('\n')) {
    if (!line) continue;
    const t = line.match(/^# TYPE (\S+) (\S+)$/);
    if (t) { types.set(t[1], t[2]); continue; }
    if (line.startsWith('#')) continue;
    const s = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/);
    assert.ok(s, `not a sample line: ${line}`);
    values.set(s[1] + (s[2] || ''), Number(s[3]));
  }
  const lb = `{model_name="${NAME}"}`;
  const v = (name) => {
    assert.ok(values.has(name + lb), `missing ${name}`);
    return values.get(name + lb);
  };
  assert.equal(types.get('shardlm:num_requests_running'), 'gauge');
  assert.equal(v('shardlm:num_requests_running'), 0);
  assert.equal(v('shardlm:num_requests_waiting'), 0);
  const kv = v('shardlm:kv_cache_usage_perc');
  assert.ok(kv >= 0 && kv <= 1);
  assert.equal(types.get('shardlm:prompt_tokens_total'), 'counter');
  assert.ok(v('shardlm:prompt_tokens_total') > 0);
  assert.ok(v('shardlm:generation_tokens_total') > 100);
  // Repeated prompts above reused their blocks; hits are a part of the lookups.
  assert.equal(types.get('shardlm:prefix_cache_hits_total'), 'counter');
  assert.ok(v('shardlm:prefix_cache_hits_total') > 0);
  assert.ok(v('shardlm:prefix_cache_hits_total') <= v('shardlm:prefix_cache_queries_total'));
  assert.ok(v('shardlm:prefix_cache_queries_total') <= v('shardlm:prompt_tokens_total'));
  // Rank 0's memory: on the CPU backend its mapped weights (the bundled file's ~1 MB) plus the KV pool.
  assert.equal(types.get('shardlm:device_memory_used_bytes'), 'gauge');
  const mem = values.get(`shardlm:device_memory_used_bytes{model_name="${NAME}",device="cpu"}`);
  assert.ok(mem > 100_000 && mem < 1e9, `device_memory_used_bytes{device="cpu"} ${mem}`);
  for (const h of ['shardlm:time_to_first_token_seconds', 'shardlm:inter_token_latency_seconds',
    'shardlm:e2e_request_latency_seconds']) {
    assert.equal(types.get(h), 'histogram', h);
    const buckets = [...values.entries()].filter(([k]) => k.startsWith(h + '_bucket{'));
    assert.ok(buckets.length > 5, h);
    for (let i = 1; i < buckets.length; ++i) assert.ok(buckets[i][1] >= buckets[i - 1][1], `${h} not cumulative`);
    const inf = values.get(`${h}_bucket{model_name="${NAME}",le="+Inf"}`);
    assert.equal(inf, v(h + '_count'));
    assert.ok(inf > 0, h);
    assert.ok(v(h + '_sum') >= 0);
  }
});

await check('SIGTERM: running requests finish, new ones get 503, exit status 0', async () => {
  const stream = await client.completions.create({ model: NAME, prompt: PROMPT, max_tokens: 60, temperature: 0,
    ignore_eos: true, stream: true });
  let text = '', finish = null, signalled = false, refused = null;
  for await (const c of stream) {
    text += c.choices[0].text;
    if (c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
    if (!signalled) {
      signalled = true;
      server.kill('SIGTERM');
    }
  }
  assert.equal(finish, 'length');
  assert.ok(text.length > 0);
  // Until it exits, the server refuses new work (or has already closed its port).
  try {
    refused = (await post('/v1/completions', { prompt: 'x', max_tokens: 2 })).status;
  } catch {
    refused = 'closed';
  }
  assert.ok(refused === 503 || refused === 'closed', `after SIGTERM: ${refused}`);
  const { code, signal } = await exited;
  server = null;
  assert.equal(signal, null, `killed by ${signal}`);
  assert.equal(code, 0, started.stderr);
});

clearTimeout(deadline);
rmSync(templatePath, { force: true });
console.log(`all ${checks} checks passed`);
