// Playground: one streamed request at a time, chat or completions, with
// per-reply timings and the exact request as curl or Python.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const output = $("output");
  const replyStats = $("reply-stats");
  let controller = null;

  const NUMBER_FIELDS = { temperature: parseFloat, top_p: parseFloat, top_k: parseInt, min_p: parseFloat,
                          max_tokens: parseInt, seed: parseInt };

  // The request body as the page sends it (streamed); empty fields are left out.
  function buildRequest() {
    const mode = $("mode").value;
    const body = {};
    if (mode === "chat") {
      const messages = [];
      const system = $("system").value;
      if (system.trim()) messages.push({ role: "system", content: system });
      messages.push({ role: "user", content: $("prompt").value });
      body.messages = messages;
    } else {
      body.prompt = $("prompt").value;
    }
    for (const [name, parse] of Object.entries(NUMBER_FIELDS)) {
      const raw = $(name).value.trim();
      if (raw !== "") body[name] = parse(raw);
    }
    const model = $("model");
    if (model.selectedIndex > 0) body.model = model.value;  // an adapter; the base model is the default
    const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
    if (stop.length) body.stop = stop;
    if ($("ignore_eos").checked) body.ignore_eos = true;
    body.stream = true;
    body.stream_options = { include_usage: true };
    return { path: mode === "chat" ? "/v1/chat/completions" : "/v1/completions", body };
  }

  function showStats(s) {
    const parts = [];
    if (s.ttft !== null) parts.push("TTFT " + s.ttft.toFixed(0) + " ms");
    if (s.tokPerS !== null) parts.push(s.tokPerS.toFixed(1) + " tok/s");
    if (s.usage) parts.push("prompt " + s.usage.prompt_tokens + " · completion " + s.usage.completion_tokens + " tokens");
    if (s.finish) parts.push("finish: " + s.finish);
    replyStats.textContent = parts.join(" · ");
  }

  async function send() {
    if (controller) return;
    const { path, body } = buildRequest();
    pagedinfer.lastRequest = { path, body };
    controller = new AbortController();
    $("send").disabled = true;
    $("stop-button").disabled = false;
    output.textContent = "";
    output.dataset.state = "streaming";
    const stats = { ttft: null, tokPerS: null, usage: null, finish: null };
    showStats(stats);
    const started = performance.now();
    let firstAt = null;
    try {
      const response = await pagedinfer.fetch(path, {
        method: "POST", body: JSON.stringify(body), signal: controller.signal,
        headers: { "Content-Type": "application/json" },
      });
      for await (const chunk of pagedinfer.readEvents(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          const text = body.messages ? (choice.delta && choice.delta.content) || "" : choice.text || "";
          if (text && firstAt === null) {
            firstAt = performance.now();
            stats.ttft = firstAt - started;
          }
          output.textContent += text;
          if (choice.finish_reason) stats.finish = choice.finish_reason;
        }
        if (chunk.usage) stats.usage = chunk.usage;
        showStats(stats);
      }
      if (firstAt !== null && stats.usage) {
        const seconds = (performance.now() - firstAt) / 1000;
        stats.tokPerS = seconds > 0 ? stats.usage.completion_tokens / seconds : null;
      }
      showStats(stats);
      output.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        stats.finish = "stopped";
        showStats(stats);
        output.dataset.state = "stopped";
      } else {
        output.dataset.state = "error";
        replyStats.textContent = "error: " + error.message;
      }
    } finally {
      controller = null;
      $("send").disabled = false;
      $("stop-button").disabled = true;
    }
  }

  // A JSON value as a Python literal (true/false/null differ).
  function pyLiteral(value, indent) {
    const pad = "    ".repeat(indent + 1);
    const end = "    ".repeat(indent);
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (Array.isArray(value)) {
      return "[" + value.map((v) => pyLiteral(v, indent + 1)).join(", ") + "]";
    }
    if (typeof value === "object") {
      const items = Object.entries(value).map(([k, v]) => pad + JSON.stringify(k) + ": " + pyLiteral(v, indent + 1));
      return "{\n" + items.join(",\n") + ",\n" + end + "}";
    }
    return JSON.stringify(value);
  }

  const VLLM_EXTRAS = ["top_k", "min_p", "ignore_eos"];  // the openai client sends these in extra_body

  function asCurl({ path, body }) {
    const auth = pagedinfer.key ? ' \\\n  -H "Authorization: Bearer $PAGEDINFER_API_KEY"' : "";
    const json = JSON.stringify(body).replace(/'/g, "'\\''");
    return "curl -N " + location.origin + path + ' \\\n  -H "Content-Type: application/json"' + auth +
      " \\\n  -d '" + json + "'";
  }

  function asPython({ path, body }) {
    const args = Object.assign({}, body);
    const extra = {};
    for (const name of VLLM_EXTRAS) {
      if (name in args) { extra[name] = args[name]; delete args[name]; }
    }
    const method = path === "/v1/chat/completions" ? "client.chat.completions.create" : "client.completions.create";
    const model = args.model || document.getElementById("model-name").textContent;
    delete args.model;
    const lines = [
      "import os", "", "from openai import OpenAI", "",
      'client = OpenAI(base_url="' + location.origin + '/v1", api_key=os.environ.get("PAGEDINFER_API_KEY", "none"))',
      "stream = " + method + "(",
      "    model=" + JSON.stringify(model) + ",",
    ];
    for (const [name, value] of Object.entries(args)) lines.push("    " + name + "=" + pyLiteral(value, 1) + ",");
    if (Object.keys(extra).length) lines.push("    extra_body=" + pyLiteral(extra, 1) + ",");
    lines.push(")");
    const content = path === "/v1/chat/completions" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
    lines.push("for chunk in stream:", "    if chunk.choices:", "        print(" + content + ', end="", flush=True)');
    return lines.join("\n");
  }

  function copy(render) {
    const snippet = $("snippet");
    snippet.textContent = render(buildRequest());  // what Send sends now
    snippet.hidden = false;
    if (navigator.clipboard) navigator.clipboard.writeText(snippet.textContent).catch(() => {});
  }

  $("send").addEventListener("click", send);
  $("stop-button").addEventListener("click", () => controller && controller.abort());
  $("copy-curl").addEventListener("click", () => copy(asCurl));
  $("copy-python").addEventListener("click", () => copy(asPython));
  $("mode").addEventListener("change", () => { $("system-label").hidden = $("mode").value !== "chat"; });
  pagedinfer.buildRequest = buildRequest;
})();
