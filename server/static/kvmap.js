// Live KV-block map: one cell per block from GET /debug/kv/stream.
// A cell's data-state is free, cached (free but holding a prefix), used or
// shared (reference count above 1); in-use cells take their owner's colour,
// and `data-adapter` the LoRA adapter its first owner runs under ("" for the
// base model; the tooltip names each owner's). Only request ids and adapter
// names reach the page, never prompt text.
"use strict";

(() => {
  const grid = document.getElementById("kv-grid");
  const header = document.getElementById("kv-header");
  const tooltip = document.getElementById("kv-tooltip");
  let cells = [];
  let info = null;  // per block: owning requests and slots filled, for the tooltip
  let snapshot = null;
  let generation = 0;  // bumps on restart; an older stream loop then stops

  function percent(x) {
    return (100 * x).toFixed(1) + "%";
  }

  function renderHeader(s) {
    const st = s.stats;
    const items = [
      ["KV usage", percent(st.kv_cache_usage) + " (" + s.num_used_blocks + "/" + s.num_blocks + " blocks)"],
      ["waste", percent(st.kv_waste_ratio)],
      ["prefix hit rate", percent(st.prefix_cache_hit_rate)],
      ["running", st.num_running],
      ["waiting", st.num_waiting],
      ["preemptions", st.num_preemptions],
      ["cached", s.num_cached_blocks],
      ["shared", s.num_shared_blocks],
    ];
    // Running requests per LoRA adapter (the engine counts them only with LoRA on).
    const adapters = Object.entries(st.running_lora_adapters || {});
    if (adapters.length) items.push([adapters.length === 1 ? "adapter" : "adapters",
                                      adapters.map(([name, n]) => name + " ×" + n).join(", ")]);
    header.replaceChildren(...items.map(([name, value]) => {
      const item = document.createElement("span");
      item.dataset.name = name;
      item.innerHTML = "<b></b> ";
      item.firstChild.textContent = String(value);
      item.append(name);
      return item;
    }));
  }

  function ensureCells(numBlocks) {
    if (cells.length === numBlocks) return;
    grid.replaceChildren();
    cells = [];
    for (let i = 0; i < numBlocks; i++) {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.dataset.blockId = i;
      cells.push(cell);
    }
    grid.append(...cells);
  }

  function render(s) {
    snapshot = s;
    ensureCells(s.num_blocks);
    const owners = Array.from({ length: s.num_blocks }, () => []);  // the requests holding each block
    const filled = new Array(s.num_blocks).fill(0);
    for (const request of s.requests) {
      request.block_table.forEach((blockId, i) => {
        owners[blockId].push(request);
        filled[blockId] = Math.max(0, Math.min(s.block_size, request.num_computed_tokens - i * s.block_size));
      });
    }
    info = { owners, filled };
    for (let i = 0; i < s.num_blocks; i++) {
      const refCnt = s.ref_cnts[i];
      const state = refCnt > 1 ? "shared" : refCnt === 1 ? "used" : s.hashes[i] !== null ? "cached" : "free";
      const first = refCnt > 0 ? owners[i][0] : undefined;
      const colour = first ? pagedinfer.colour(first.request_id) : "";
      const adapter = (first && first.lora_name) || "";
      const cell = cells[i];
      if (cell.dataset.state !== state) {
        cell.dataset.state = state;
        cell.className = "cell state-" + state;
      }
      if (cell.dataset.adapter !== adapter) cell.dataset.adapter = adapter;
      if (cell.colour !== colour) {  // the browser rewrites style colours, so compare our own copy
        cell.colour = colour;
        cell.style.backgroundColor = colour;
      }
    }
    renderHeader(s);
    grid.dataset.updated = String(s.time);
  }

  function clear() {
    grid.replaceChildren();
    header.replaceChildren();
    cells = [];
    snapshot = info = null;
    delete grid.dataset.updated;
  }

  async function stream() {
    const mine = ++generation;
    while (mine === generation) {
      try {
        const response = await pagedinfer.fetch("/debug/kv/stream");
        pagedinfer.setStatus("ok", "live");
        for await (const event of pagedinfer.readEvents(response)) {
          if (mine !== generation) return;
          if (event.error) throw new Error(event.error.message);
          render(event);
        }
      } catch (error) {
        if (mine !== generation) return;
        if (error.message === "unauthorised") {
          clear();
          return;  // waits for a key; useKey() restarts
        }
        pagedinfer.setStatus("error", "map: " + error.message + "; retrying");
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  function ownerLabel(request) {
    return request.request_id + (request.lora_name ? " (adapter " + request.lora_name + ")" : "");
  }

  grid.addEventListener("mousemove", (event) => {
    const cell = event.target.closest(".cell");
    if (!cell || !snapshot) {
      tooltip.hidden = true;
      return;
    }
    const i = Number(cell.dataset.blockId);
    const hash = snapshot.hashes[i];
    const lines = [
      "block " + i,
      "ref count " + snapshot.ref_cnts[i],
      "owners " + (info.owners[i].length ? info.owners[i].map(ownerLabel).join(", ") : "none"),
      "slots filled " + (snapshot.ref_cnts[i] ? info.filled[i] : 0) + "/" + snapshot.block_size,
      "prefix hash " + (hash === null ? "none" : hash),
    ];
    tooltip.textContent = lines.join("\n");
    tooltip.hidden = false;
    tooltip.style.left = event.pageX + 12 + "px";
    tooltip.style.top = event.pageY + 12 + "px";
  });
  grid.addEventListener("mouseleave", () => { tooltip.hidden = true; });

  pagedinfer.onRestart(stream);
  stream();
})();
