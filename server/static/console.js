// Shared by the console's panels: the API key, authorised fetches, the
// status line and a server-sent-events reader. fetch() rather than
// EventSource everywhere, because EventSource cannot send the API key.
"use strict";

const KEY_STORAGE = "pagedinfer-api-key";  // sessionStorage only: gone with the tab

const pagedinfer = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  restartHandlers: [],  // panels re-subscribe here when the key changes

  headers(extra) {
    const headers = Object.assign({}, extra || {});
    if (this.key) headers.Authorization = "Bearer " + this.key;
    return headers;
  },

  // fetch with the key; a 401 puts the page in its error state and throws.
  async fetch(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = this.headers(opts.headers);
    const response = await fetch(path, opts);
    if (response.status === 401) {
      this.setStatus("error", "API key missing or wrong: enter it above.");
      document.body.dataset.auth = "denied";
      throw new Error("unauthorised");
    }
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    document.body.dataset.auth = "ok";
    return response;
  },

  setStatus(state, text) {
    const status = document.getElementById("status");
    status.dataset.state = state;
    status.textContent = text;
  },

  // Yields the JSON payload of each `data:` event until `[DONE]`.
  async *readEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  },

  onRestart(handler) {
    this.restartHandlers.push(handler);
  },

  useKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    this.setStatus("loading", "connecting…");
    for (const handler of this.restartHandlers) handler();
  },

  // A stable colour per request id, so a request keeps its colour across updates.
  colour(requestId) {
    let hash = 0;
    for (let i = 0; i < requestId.length; i++) hash = (hash * 31 + requestId.charCodeAt(i)) | 0;
    return "hsl(" + (((hash % 360) + 360) % 360) + ", 70%, 50%)";
  },
};

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  pagedinfer.useKey(input.value.trim());
  input.value = "";
});

// The base model names the page; it and its LoRA adapters fill the playground's
// model list. Again whenever the key changes: without the right one it is a 401.
function loadModels() {
  fetch("/v1/models", { headers: pagedinfer.headers() })
    .then((r) => (r.ok ? r.json() : null))
    .then((models) => {
      if (!models) return;
      document.getElementById("model-name").textContent = models.data[0].id;
      document.getElementById("model").replaceChildren(...models.data.map((card) => {
        const option = document.createElement("option");
        option.value = option.textContent = card.id;
        if (card.parent) option.textContent += " (LoRA adapter)";
        return option;
      }));
    })
    .catch(() => {});
}
pagedinfer.onRestart(loadModels);
loadModels();
