// Metrics panel: line charts of GET /debug/stats (one point a second, the
// server's own stats over the last 5 minutes), drawn on canvases.
"use strict";

(() => {
  const WINDOW_S = 300;
  const POLL_MS = 2000;
  const MAIN = "#2563eb";
  const SECOND = "#f59e0b";
  const CHARTS = [
    { canvas: "chart-tokens", series: [["output_tokens_per_s", MAIN, 1]] },
    { canvas: "chart-requests", series: [["running", MAIN, 1], ["waiting", SECOND, 1]] },
    { canvas: "chart-kv", series: [["kv_usage", MAIN, 100]], max: 100 },
    { canvas: "chart-latency", series: [["ttft_s", MAIN, 1000], ["itl_s", SECOND, 1000]] },
  ];
  let timer = null;

  function draw(chart, points, now) {
    const canvas = document.getElementById(chart.canvas);
    // Draw at the size the page gives the canvas, so text is not stretched.
    canvas.width = canvas.clientWidth || canvas.width;
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    const left = 36, bottom = height - 14;
    ctx.clearRect(0, 0, width, height);
    let top = chart.max || 0;
    for (const [key, , scale] of chart.series) {
      for (const p of points) if (p[key] !== null) top = Math.max(top, p[key] * scale);
    }
    top = top > 0 ? top * (chart.max ? 1 : 1.15) : 1;
    ctx.strokeStyle = "#d4d4d8";
    ctx.fillStyle = "#71717a";
    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    for (const frac of [0, 0.5, 1]) {
      const y = bottom - frac * (bottom - 4);
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width, y); ctx.stroke();
      ctx.fillText(String(+(top * frac).toPrecision(3)), 2, y + 3);
    }
    ctx.fillText("-5 min", left, height - 2);
    ctx.fillText("now", width - 20, height - 2);
    const x = (t) => left + (1 - (now - t) / WINDOW_S) * (width - left);
    const y = (v) => bottom - (v / top) * (bottom - 4);
    for (const [key, colour, scale] of chart.series) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let drawing = false;
      for (const p of points) {
        if (p[key] === null || now - p.time > WINDOW_S) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(p.time), y(p[key] * scale));
        else ctx.moveTo(x(p.time), y(p[key] * scale));
        drawing = true;
      }
      ctx.stroke();
      // Dots too: a latency seen in one second only has no neighbour to join.
      ctx.fillStyle = colour;
      for (const p of points) {
        if (p[key] !== null && now - p.time <= WINDOW_S) ctx.fillRect(x(p.time) - 1, y(p[key] * scale) - 1, 3, 3);
      }
    }
  }

  function drawAll(points) {
    const now = points.length ? points[points.length - 1].time : Date.now() / 1000;
    for (const chart of CHARTS) draw(chart, points, now);
  }

  async function poll() {
    try {
      const history = await (await pagedinfer.fetch("/debug/stats")).json();
      drawAll(history.points);
    } catch (error) {
      if (error.message === "unauthorised") {
        drawAll([]);
        return;  // no data without the key; useKey() restarts
      }
    }
    timer = setTimeout(poll, POLL_MS);
  }

  pagedinfer.onRestart(() => {
    clearTimeout(timer);
    poll();
  });
  poll();
})();
