"""Markdown tables of a `bench/kernels.py` run: decode and prefill with a column block per dtype,
the KV store, and the prefill configs the autotuner chose. Plain Python over the results dict."""

from __future__ import annotations


def _cells(r: dict | None, fields: list[tuple[str, str]]) -> list[str]:
    if r is None or "skipped" in r:
        return ["skipped"] + [""] * (len(fields) - 1)
    return [format(r[key], spec) for key, spec in fields]


def markdown(results: dict) -> str:
    """The decode, prefill and store tables, a column block per dtype, and the tuned configs."""
    dtypes = results["dtypes"]
    copy = results["copy_GBps"]
    lines = [f"# Kernels on {results['device']}", "",
             f"torch {results['torch']}, triton {results['triton']}; device-to-device copy {copy:.0f} GB/s.", "",
             "## Decode: ms under CUDA-graph replay, eager host µs per call", ""]
    dec_fields = [("kernel_ms", ".4f"), ("sdpa_ms", ".4f"), ("kernel_over_sdpa", ".2f"),
                  ("copy_share", ".0%"), ("graph_bound_ms", ".4f"), ("host_us", ".1f")]
    dec_names = ["kernel ms", "SDPA ms", "kernel/SDPA", "share of copy", "ms at max_model_len grid", "host µs"]
    pre_fields = [("kernel_TFLOPs", ".0f"), ("sdpa_TFLOPs", ".0f"), ("kernel_over_sdpa_speed", ".2f"),
                  ("host_us", ".1f")]
    pre_names = ["kernel TFLOP/s", "SDPA TFLOP/s", "kernel/SDPA speed", "host µs"]
    for title, section, first, fields, names in (
        (None, "decode", "batch × context", dec_fields, dec_names),
        ("## Prefill (causal): TFLOP/s under CUDA-graph replay, eager host µs per call", "prefill",
         "chunk / context before / requests", pre_fields, pre_names),
    ):
        if title:
            lines += ["", title, ""]
        lines.append("| heads | " + first + " | " + " | ".join(f"{dt} {n}" for dt in dtypes for n in names) + " |")
        lines.append("|---" * (2 + len(dtypes) * len(names)) + "|")
        rows = results[section]
        for name in results["groups"]:
            for i, r0 in enumerate(rows[dtypes[0]][name]):
                label = (f"{r0['batch']} × {r0['context']}" if section == "decode"
                         else f"{r0['chunk']} / {r0['context_before']} / {r0['num_reqs']}")
                cells = [c for dt in dtypes for c in _cells(rows[dt][name][i], fields)]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## KV store (GQA4 shape), ms under CUDA-graph replay", "",
              "| dtype | tokens | kernel ms | torch ms | kernel GB/s |", "|---|---|---|---|---|"]
    for dt in dtypes:
        for r in results["store_kv"][dt]:
            lines.append(f"| {dt} | {r['tokens']} | {r['kernel_ms']:.4f} | {r['torch_ms']:.4f} | "
                         f"{r['kernel_GBps']:.0f} |")
    lines += ["", "## Prefill configs chosen by the autotuner", "",
              "| key (head_dim, BLOCK_G, length bucket, dtypes) | config |", "|---|---|"]
    lines += [f"| {key} | {config} |" for key, config in results["tuned_configs"].items()] or ["| none (interpreter) | |"]
    return "\n".join(lines) + "\n"
