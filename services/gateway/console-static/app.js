// The Corral console: polls the gateway's /api/status, draws the fleet, runs admin actions after a
// confirmation, and streams playground chats through the gateway's own /api/chat. Plain browser
// JavaScript, served as is: nothing to build, nothing fetched from anywhere but the gateway.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TAGS_EVERY = 5; // polls between refreshes of the model list
  const SPAN_MS = 15 * 60 * 1000;
  const GIB = 1024 ** 3;
  const $ = (id) => document.getElementById(id);

  const state = {
    key: sessionStorage.getItem("corral.key") || "",
    role: "", // "admin" or "user" once the gateway said (until then no admin button is live)
    auth: "off",
    history: [], // [{t, rps, tps, p50, p95}] from each poll, the last 15 minutes
    signatures: {},
    polls: 0,
    statusNotice: false, // the notice shows a failed /api/status poll (cleared by the next that works)
    messages: [], // the playground conversation
  };

  // -- small DOM helpers ---------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") n.textContent = v;
      else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
      else n.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) n.append(c);
    return n;
  }
  const gib = (n) => (n / GIB).toFixed(1);

  function until(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return "–";
    const s = Math.round((t - Date.now()) / 1000);
    if (s <= 0) return "now";
    if (s > 86400 * 365) return "never";
    if (s < 120) return `in ${s} s`;
    if (s < 7200) return `in ${Math.round(s / 60)} min`;
    return `in ${Math.round(s / 3600)} h`;
  }

  function notice(text, isError) {
    const n = $("notice");
    n.textContent = text;
    n.classList.toggle("error", !!isError);
    n.hidden = !text;
  }

  // -- the gateway ---------------------------------------------------------------------------
  class Unreachable extends Error {}

  async function api(path, opts) {
    const o = opts || {};
    const headers = new Headers(o.headers || {});
    if (state.key) headers.set("Authorization", "Bearer " + state.key);
    let r;
    try {
      r = await fetch(path, { ...o, headers, cache: "no-store" });
    } catch (e) {
      $("unreachable-detail").textContent = `(${e.message})`;
      $("unreachable").hidden = false;
      document.body.classList.add("offline");
      throw new Unreachable(e.message);
    }
    $("unreachable").hidden = true;
    document.body.classList.remove("offline");
    if (r.status === 401) askKey();
    return r;
  }

  async function errorOf(r) {
    try {
      const body = await r.json();
      return body.error || `${r.status} ${r.statusText}`;
    } catch {
      return `${r.status} ${r.statusText}`;
    }
  }

  // Each NDJSON object of a streamed reply, as it arrives.
  async function* lines(r) {
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line) yield JSON.parse(line);
      }
    }
    if (buf.trim()) yield JSON.parse(buf);
  }

  function askKey() {
    $("key-form").hidden = false;
  }

  async function whoami() {
    try {
      const r = await api("/api/corral/whoami");
      if (!r.ok) return;
      const me = await r.json();
      state.role = me.role;
      state.auth = me.auth;
      $("whoami").textContent = me.auth === "off" ? "API keys off" : `key ${me.name} (${me.role})`;
      const user = me.role !== "admin";
      document.body.classList.toggle("user-role", user);
      for (const b of document.querySelectorAll(".admin button, .admin input")) b.disabled = user;
      state.signatures = {}; // redraw the action buttons for this role
    } catch (e) {
      if (!(e instanceof Unreachable)) throw e;
    }
  }

  // -- the fleet -----------------------------------------------------------------------------
  function adminButton(label, focusId, title, run, disabled) {
    const user = state.role !== "admin";
    return el("button", {
      type: "button",
      "data-focus": focusId,
      "aria-label": title,
      title: user ? "needs an admin key" : title,
      disabled: user || disabled,
      onclick: run,
      text: label,
    });
  }

  // Redraw a table body only when what it shows changed, keeping keyboard focus where it was.
  function redraw(tbody, signature, rows) {
    if (state.signatures[tbody.id || tbody.parentElement.id] === signature) return;
    state.signatures[tbody.id || tbody.parentElement.id] = signature;
    const focused = document.activeElement && document.activeElement.getAttribute("data-focus");
    tbody.replaceChildren(...rows);
    if (focused) {
      const again = tbody.querySelector(`[data-focus="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  function gpuCell(a) {
    if (!a.gpus.length) return el("span", { class: "muted", text: "no GPU" });
    return el(
      "div",
      { class: "gpus" },
      ...a.gpus.map((g) => {
        const used = g.vram_total - g.vram_free;
        const pct = g.vram_total ? Math.round((100 * used) / g.vram_total) : 0;
        const meter = { class: "bar", role: "meter", "aria-label": `${g.name} VRAM used` };
        Object.assign(meter, { "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct });
        return el(
          "div",
          { class: "gpu" },
          el("span", { class: "gpu-name", text: g.name }),
          el("div", meter, el("div", { class: "fill", style: `width:${pct}%` })),
          el("span", { class: "vram", text: `${gib(used)} / ${gib(g.vram_total)} GiB` }),
        );
      }),
    );
  }

  function agentRow(a) {
    const act = (action) => () =>
      confirmThen(`${action[0].toUpperCase() + action.slice(1)} agent ${a.id}?`, () => control(a.id, action));
    return el(
      "tr",
      { "data-agent": a.id },
      el("th", { scope: "row", text: a.id }),
      el("td", { text: a.vendor }),
      el("td", { text: a.host || "–" }),
      el("td", {}, el("span", { class: `status ${a.status}`, text: a.ollama_down ? `${a.status}, ollama down` : a.status })),
      el("td", {}, gpuCell(a)),
      el("td", { title: `${a.parallel} per loaded model`, text: `${a.in_flight} / ${a.slots ?? a.parallel}` }),
      el("td", { text: String(a.queued) }),
      el(
        "td",
        { class: "actions" },
        adminButton("Drain", `drain:${a.id}`, `drain ${a.id}`, act("drain"), a.status !== "active"),
        adminButton("Cordon", `cordon:${a.id}`, `cordon ${a.id}`, act("cordon"), a.status !== "active"),
        adminButton("Uncordon", `uncordon:${a.id}`, `uncordon ${a.id}`, act("uncordon"), a.status === "active"),
      ),
    );
  }

  function loadedRows(agents) {
    const rows = [];
    for (const a of agents) {
      for (const m of a.loaded) {
        const ask = () =>
          confirmThen(`Unload ${m.model} from every agent that has it loaded?`, () => unload(m.model));
        rows.push(
          el(
            "tr",
            {},
            el("th", { scope: "row", text: m.model }),
            el("td", { text: a.id }),
            el("td", { text: m.context_length ? m.context_length.toLocaleString("en") : "–" }),
            el("td", { text: `${gib(m.size_vram)} GiB` }),
            el("td", { text: m.busy ? "in use" : "idle" }),
            el("td", { title: m.expires_at, text: until(m.expires_at) }),
            el("td", { class: "actions" }, adminButton("Unload", `unload:${a.id}:${m.model}`, `unload ${m.model}`, ask)),
          ),
        );
      }
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No model loaded." })));
    return rows;
  }

  function render(st) {
    const t = st.totals;
    $("totals").textContent =
      `${t.agents} agents (${t.active} active), ${t.gpus} GPUs, VRAM ${gib(t.vram_total - t.vram_free)} of ` +
      `${gib(t.vram_total)} GiB used, ${t.models} models, ${t.loaded} loaded, ${t.in_flight} running, ${t.queued} queued`;
    const agentsSig = JSON.stringify([state.role, st.agents.map((a) => [a.id, a.vendor, a.host, a.status, a.ollama_down, a.gpus, a.in_flight, a.parallel, a.slots, a.queued])]);
    redraw($("agents").tBodies[0], agentsSig, st.agents.map(agentRow));
    const loadedSig = JSON.stringify([state.role, Math.floor(Date.now() / 10000), st.agents.map((a) => [a.id, a.loaded, a.in_flight])]);
    redraw($("loaded").tBodies[0], loadedSig, loadedRows(st.agents));
    const queue = Object.entries(st.queue || {});
    $("queue").textContent = queue.length
      ? queue.map(([m, n]) => `${m}: ${n} waiting`).join(", ")
      : "Nothing waiting in the fleet queue.";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
    const away = st.nats_away_s;
    $("nats-away").hidden = away == null;
    $("nats-away-detail").textContent =
      away == null
        ? ""
        : `This gateway has been cut off from NATS for ${Math.round(away)} s: what follows is the fleet as ` +
          "it last saw it, and model requests fail until NATS is back.";
  }

  function record(st) {
    const now = Date.now();
    const r = st.rates;
    state.history.push({
      t: now,
      rps: r ? r.requests_per_s : null,
      tps: r ? r.tokens_per_s : null,
      p50: r && r.ttft_ms_p50 != null ? r.ttft_ms_p50 : null,
      p95: r && r.ttft_ms_p95 != null ? r.ttft_ms_p95 : null,
    });
    while (state.history.length && state.history[0].t < now - SPAN_MS) state.history.shift();
    $("rates-note").textContent = r
      ? `Rolling ${Math.round(r.window_s)} s figures from the aggregator, sampled every ${POLL_MS / 1000} s since this page opened.`
      : st.nats_away_s != null
        ? "No rates while this gateway is cut off from NATS."
        : "No aggregator is running: no rates to chart.";
    const pts = (f) => state.history.map((h) => [h.t, h[f]]);
    const C = window.CorralCharts;
    C.draw($("chart-rps"), [{ cls: "rps", points: pts("rps") }], SPAN_MS, now);
    C.draw($("chart-tps"), [{ cls: "tps", points: pts("tps") }], SPAN_MS, now);
    C.draw($("chart-ttft"), [{ cls: "p50", points: pts("p50") }, { cls: "p95", points: pts("p95") }], SPAN_MS, now);
  }

  async function refreshTags() {
    const r = await api("/api/tags");
    if (!r.ok) return;
    const models = (await r.json()).models;
    const names = models.map((m) => m.name).sort();
    // BERT-family models (all-minilm, nomic-embed-text) only embed: not the playground's first pick
    const embedders = new Set(models.filter((m) => /bert$/i.test((m.details && m.details.family) || "")).map((m) => m.name));
    const list = $("model-names");
    list.replaceChildren(...names.map((n) => el("option", { value: n })));
    const select = $("chat-model");
    const keep = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(keep)) select.value = keep;
    else select.value = names.find((n) => !embedders.has(n)) || names[0] || "";
  }

  async function refresh() {
    try {
      if (!state.role) await whoami(); // it failed before (a 429, a gateway restarting): ask again
      const r = await api("/api/status");
      if (r.ok) {
        const st = await r.json();
        render(st);
        record(st);
        if (state.statusNotice) notice(""); // the error it showed is over
        state.statusNotice = false;
      } else if (r.status !== 401) {
        notice(`/api/status: ${await errorOf(r)}`, true);
        state.statusNotice = true;
      }
      if (state.polls++ % TAGS_EVERY === 0 || !$("chat-model").options.length) await refreshTags();
    } catch (e) {
      if (!(e instanceof Unreachable)) throw e;
    }
  }

  async function loop() {
    try {
      await refresh();
    } finally {
      setTimeout(loop, POLL_MS);
    }
  }

  // -- admin actions -------------------------------------------------------------------------
  function confirmThen(text, action) {
    const dialog = $("confirm");
    const opener = document.activeElement && document.activeElement.getAttribute("data-focus");
    $("confirm-text").textContent = text;
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      async () => {
        if (dialog.returnValue === "ok") await guarded(action);
        const back = opener && document.querySelector(`[data-focus="${CSS.escape(opener)}"]`);
        if (back) back.focus();
      },
      { once: true },
    );
    dialog.showModal();
    $("confirm-cancel").focus();
  }

  async function guarded(action) {
    try {
      await action();
    } catch (e) {
      if (!(e instanceof Unreachable)) notice(`failed: ${e.message}`, true);
    }
  }

  async function control(agent, action) {
    const r = await api(`/api/corral/agents/${encodeURIComponent(agent)}/${action}`, { method: "POST" });
    if (!r.ok) return notice(`${action} ${agent}: ${await errorOf(r)}`, true);
    const body = await r.json();
    notice(`${agent} is ${body.status}.`);
    await refresh();
  }

  async function unload(model) {
    const r = await api("/api/corral/unload", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model }),
    });
    if (!r.ok) return notice(`unload ${model}: ${await errorOf(r)}`, true);
    const body = await r.json();
    notice(`${model} unloaded from ${body.unloaded.join(", ")}.`);
    await refresh();
  }

  async function pull(ev) {
    ev.preventDefault();
    const model = $("pull-model").value.trim();
    const replicas = $("pull-replicas").value;
    confirmThen(`Pull ${model} onto ${replicas} agent(s)?`, async () => {
      const bar = $("pull-progress");
      const status = $("pull-status");
      bar.hidden = false;
      bar.value = 0;
      status.textContent = "starting…";
      const r = await api("/api/pull", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Corral-Replicas": replicas },
        body: JSON.stringify({ model, stream: true }),
      });
      if (!r.ok) {
        status.textContent = `failed: ${await errorOf(r)}`;
        return;
      }
      let failed = false;
      for await (const p of lines(r)) {
        if (p.error) {
          failed = true;
          status.textContent = `failed: ${p.error}`;
          continue;
        }
        if (p.total) bar.value = (p.completed || 0) / p.total;
        status.textContent = p.status;
      }
      if (!failed) {
        bar.value = 1;
        status.textContent = `${model}: done`;
      }
      await refreshTags();
    });
  }

  async function remove(ev) {
    ev.preventDefault();
    const model = $("delete-model").value.trim();
    confirmThen(`Delete ${model} from every agent's disk?`, async () => {
      const r = await api("/api/delete", {
        method: "DELETE",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model }),
      });
      $("delete-status").textContent = r.ok ? `${model} deleted` : `failed: ${await errorOf(r)}`;
      await refreshTags();
      await refresh();
    });
  }

  // -- the playground ------------------------------------------------------------------------
  async function chat(ev) {
    ev.preventDefault();
    const prompt = $("chat-prompt").value.trim();
    if (!prompt) return;
    const vendor = $("chat-vendor").value;
    const base = $("chat-model").value;
    const model = vendor ? `${vendor}/${base}` : base;
    const strategy = $("chat-strategy").value;
    const headers = { "Content-Type": "application/json" };
    if (strategy !== "auto") headers["X-Load-Balancing-Strategy"] = strategy;
    if (vendor && $("chat-strict").checked) headers["X-Enforce-Strategy"] = "true";
    state.messages.push({ role: "user", content: prompt });
    const log = $("chat-log");
    log.append(el("div", { class: "msg user", text: prompt }));
    const answer = el("div", { class: "msg assistant", "aria-busy": "true" });
    const footer = el("div", { class: "msg-meta muted" });
    log.append(answer, footer);
    $("chat-prompt").value = "";
    $("chat-send").disabled = true;
    for (const id of ["chat-agent", "chat-route", "chat-ttft", "chat-tokens"]) $(id).textContent = "…";
    const t0 = performance.now();
    let ttft = null;
    let text = "";
    try {
      const r = await api("/api/chat", {
        method: "POST",
        headers,
        body: JSON.stringify({ model, messages: state.messages, stream: true }),
      });
      const agent = r.headers.get("X-Corral-Agent");
      const route = r.headers.get("X-Corral-Route");
      $("chat-agent").textContent = agent || "not reported by this gateway";
      $("chat-route").textContent = route || "not reported by this gateway";
      if (!r.ok) throw new Error(await errorOf(r));
      for await (const part of lines(r)) {
        if (part.error) throw new Error(part.error);
        const piece = (part.message && part.message.content) || "";
        if (piece && ttft === null) {
          ttft = performance.now() - t0;
          $("chat-ttft").textContent = `${Math.round(ttft)} ms`;
        }
        text += piece;
        answer.textContent = text;
        if (part.done) {
          const rate = part.eval_duration ? (part.eval_count / (part.eval_duration / 1e9)).toFixed(1) : "–";
          $("chat-tokens").textContent = `${part.prompt_eval_count || 0} in, ${part.eval_count || 0} out (${rate} tokens/s)`;
        }
      }
      state.messages.push({ role: "assistant", content: text });
      footer.textContent = `served by ${agent || "an agent the gateway did not name"}` +
        (ttft !== null ? `, first token after ${Math.round(ttft)} ms` : "");
    } catch (e) {
      state.messages.pop();
      answer.classList.add("error");
      answer.textContent = text + (text ? "\n" : "") + `error: ${e.message}`;
      if ($("chat-ttft").textContent === "…") $("chat-ttft").textContent = "–";
      if ($("chat-tokens").textContent === "…") $("chat-tokens").textContent = "–";
    } finally {
      answer.removeAttribute("aria-busy");
      $("chat-send").disabled = false;
      $("chat-prompt").focus();
    }
  }

  // -- wiring --------------------------------------------------------------------------------
  function selectTab(name) {
    for (const t of ["fleet", "playground"]) {
      const on = t === name;
      $(`tab-${t}`).setAttribute("aria-selected", String(on));
      $(`panel-${t}`).hidden = !on;
    }
  }

  function start() {
    $("tab-fleet").addEventListener("click", () => selectTab("fleet"));
    $("tab-playground").addEventListener("click", () => {
      selectTab("playground");
      $("chat-prompt").focus();
    });
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.key = $("key-input").value.trim();
      sessionStorage.setItem("corral.key", state.key);
      $("key-form").hidden = true;
      whoami().then(refresh);
    });
    $("pull-form").addEventListener("submit", pull);
    $("delete-form").addEventListener("submit", remove);
    $("chat-form").addEventListener("submit", chat);
    $("chat-prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("chat-form").requestSubmit();
    });
    $("chat-clear").addEventListener("click", () => {
      state.messages = [];
      $("chat-log").replaceChildren();
    });
    whoami().then(loop);
  }

  start();
})();
