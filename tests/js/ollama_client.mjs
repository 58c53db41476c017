// The official Ollama JavaScript client (npm `ollama`) against one Ollama endpoint, a Corral gateway.
//
//   node ollama_client.mjs URL [MODEL] [EMBED_MODEL] [PULL_MODEL]
//
// Lists and shows, embeds with EMBED_MODEL, streams a generate and a chat with MODEL (each checked
// against the same request unstreamed), pulls PULL_MODEL with streamed progress, then reads /api/ps.
// Prints one JSON summary on stdout; a failed check is printed on stderr and the exit status is 1.
import { Ollama } from 'ollama'

const [url, model = 'llama3.2', embedModel = 'all-minilm', pullModel = 'nomic-embed-text'] = process.argv.slice(2)
if (!url) {
  console.error('usage: node ollama_client.mjs URL [MODEL] [EMBED_MODEL] [PULL_MODEL]')
  process.exit(2)
}

const client = new Ollama({ host: url })

function check(ok, what, got) {
  if (!ok) throw new Error(`check failed: ${what}; got ${JSON.stringify(got)}`)
}

const full = (name) => (name.includes(':') ? name : `${name}:latest`)

async function list() {
  const { models } = await client.list()
  const names = models.map((m) => m.model)
  check(names.length === new Set(names).size, 'each model once in /api/tags', names)
  check(names.includes(full(model)), `${full(model)} listed`, names)
  check(!names.includes(full(pullModel)), `${full(pullModel)} not on disk before the pull`, names)
  return { models: names }
}

async function show() {
  const shown = await client.show({ model })
  const arch = shown.model_info['general.architecture']
  const context = shown.model_info[`${arch}.context_length`]
  check(shown.capabilities.includes('completion'), 'show: completion capability', shown.capabilities)
  check(Number.isInteger(context) && context > 0, 'show: context length in model_info', context)
  return { family: shown.details.family, capabilities: shown.capabilities, context_length: context }
}

async function generate() {
  const request = { model, prompt: 'why is the sky blue?', options: { seed: 7 } }
  const parts = []
  for await (const part of await client.generate({ ...request, stream: true })) parts.push(part)
  const last = parts[parts.length - 1]
  check(parts.length > 2, 'generate streams several parts', parts.length)
  check(last.done && parts.slice(0, -1).every((p) => !p.done), 'only the last part is done', parts.length)
  check(parts.every((p) => p.model === model), 'every part names the model asked for', parts[0].model)
  check(last.eval_count >= parts.length - 1, 'eval_count counts the streamed tokens', last.eval_count)
  const text = parts.map((p) => p.response).join('')
  const whole = await client.generate(request)
  check(whole.response === text, 'streamed text equals the unstreamed answer', [text, whole.response])
  return { parts: parts.length, text, done_reason: last.done_reason, eval_count: last.eval_count }
}

async function chat() {
  const request = { model, messages: [{ role: 'user', content: 'hello there' }], options: { seed: 3 } }
  const chunks = []
  for await (const chunk of await client.chat({ ...request, stream: true })) chunks.push(chunk)
  const last = chunks[chunks.length - 1]
  check(chunks.length > 2 && last.done, 'chat streams several chunks, the last done', chunks.length)
  check(chunks.every((c) => c.message.role === 'assistant'), 'every chunk is the assistant', chunks[0])
  check(chunks.every((c) => c.model === model), 'every chunk names the model asked for', chunks[0].model)
  const text = chunks.map((c) => c.message.content).join('')
  const whole = await client.chat(request)
  check(whole.message.content === text, 'streamed chat equals the unstreamed one', [text, whole.message.content])
  return { chunks: chunks.length, text, done_reason: last.done_reason }
}

async function pull() {
  const progress = []
  for await (const p of await client.pull({ model: pullModel, stream: true })) progress.push(p)
  const statuses = progress.map((p) => p.status)
  check(statuses[0] === 'pulling manifest', 'pull starts with the manifest', statuses[0])
  check(statuses[statuses.length - 1] === 'success', 'pull ends in success', statuses.slice(-3))
  const layers = {}
  for (const p of progress) {
    if (!p.digest) continue
    check(p.total > 0 && (p.completed ?? 0) <= p.total, 'progress within its total', p)
    const seen = layers[p.digest] ?? { total: p.total, completed: 0 }
    check(seen.total === p.total, 'a layer keeps its total', [seen, p])
    check((p.completed ?? 0) >= seen.completed, 'progress never goes back', [seen, p])
    layers[p.digest] = { total: p.total, completed: p.completed ?? 0 }
  }
  const digests = Object.keys(layers)
  check(digests.length > 0, 'pull reports its layers', progress.length)
  check(digests.every((d) => layers[d].completed === layers[d].total), 'every layer completes', layers)
  const total = digests.reduce((sum, d) => sum + layers[d].total, 0)
  return { updates: progress.length, first: statuses[0], last: statuses[statuses.length - 1], layers: digests.length, total }
}

async function embed() {
  const result = await client.embed({ model: embedModel, input: ['a', 'b'] })
  const [a, b] = result.embeddings
  check(result.embeddings.length === 2, 'one vector per input', result.embeddings.length)
  check(a.length === b.length && a.length > 0, 'vectors of one dimension', [a.length, b.length])
  const norm = Math.sqrt(a.reduce((s, v) => s + v * v, 0))
  check(Math.abs(norm - 1) < 1e-6, 'unit vectors, as Ollama returns', norm)
  check(a.some((v, i) => v !== b[i]), 'different inputs, different vectors', null)
  check(result.model === embedModel, 'embed names the model asked for', result.model)
  return { model: result.model, count: result.embeddings.length, dim: a.length, first: a }
}

async function ps() {
  const { models } = await client.ps()
  const rows = models
    .filter((m) => m.model === full(model) || m.model === full(embedModel))
    .map((m) => ({ model: m.model, agent: m.corral?.agent, vendor: m.corral?.vendor, size_vram: m.size_vram }))
  check(rows.every((r) => r.agent && r.vendor), 'each /api/ps row says which agent runs it', rows)
  check(rows.some((r) => r.model === full(model)), `${full(model)} loaded after generating`, rows)
  check(rows.some((r) => r.model === full(embedModel)), `${full(embedModel)} loaded after embedding`, rows)
  return { rows }
}

try {
  const summary = {}
  summary.list = await list()
  summary.show = await show()
  summary.embed = await embed()
  summary.generate = await generate()
  summary.chat = await chat()
  summary.pull = await pull()
  summary.ps = await ps()
  console.log(JSON.stringify(summary))
} catch (err) {
  console.error(err instanceof Error ? err.message : err)
  process.exit(1)
}
