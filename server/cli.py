"""The `pagedinfer` command: prepare-model, generate and serve.

A bad flag stops the command before anything loads, with exit code 2 (as
argparse does): argparse's own checks print the usage too; the checks of
`check_args` (the JSON of --kv-events-config and --speculative-config, the hash algorithm, whether
the event endpoints can be bound, the OTLP traces endpoint and protocol)
print one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import sys

from server.lora_args import add_lora_args, lora_config_from_args


def _capture_size(text: str) -> int:
    size = int(text) if text.strip().isdigit() else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"a decode batch size must be a whole number >= 1, got {text!r}")
    return size


def _engine_threads(text: str) -> int | str:
    if text == "auto":
        return text
    count = int(text) if text.strip().isdigit() else 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"'auto' or a thread count >= 1, got {text!r}")
    return count


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (CPU default)")
    capacity.add_argument("--gpu-memory-utilization", type=float, default=None)
    capacity.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--enforce-eager", action="store_true", default=None,
        help="no CUDA graphs: run every decode step eagerly (the CPU always does)",
    )
    parser.add_argument(
        "--max-cudagraph-capture-size", type=_capture_size, default=None, metavar="N",
        help="the largest decode batch captured as a CUDA graph (default: --max-num-seqs); larger ones run "
             "eagerly. Each captured size costs start-up time",
    )
    parser.add_argument(
        "--cudagraph-capture-sizes", type=_capture_size, nargs="+", default=None, metavar="N",
        help="the decode batch sizes captured as CUDA graphs (default: 1 2 4 8, then every 16)",
    )
    parser.add_argument(
        "--load-format", choices=["safetensors", "dummy"], default="safetensors",
        help="dummy: random weights built on the device from config.json alone (benchmarks; outputs are noise)",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="split the model across this many processes (one GPU each on CUDA)",
    )
    parser.add_argument(
        "--prefix-caching-hash-algo", default="sha256_cbor", metavar="{sha256_cbor,sha256}",
        help="block hash: sha256_cbor is vLLM's, which routers recompute (share PYTHONHASHSEED across "
             "the fleet); sha256 is pagedinfer's older, cheaper one",
    )
    parser.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help='speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, '
             '"prompt_lookup_min": 2, "prompt_lookup_max": 5}',
    )
    add_lora_args(parser)


def engine_config_from_args(args: argparse.Namespace):
    from inference.config import EngineConfig

    return EngineConfig.create(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_cudagraph_capture_size=args.max_cudagraph_capture_size,
        cudagraph_capture_sizes=args.cudagraph_capture_sizes,
        load_format=args.load_format,
        tensor_parallel_size=args.tensor_parallel_size,
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
        kv_events=_kv_events_config(args),
        lora=lora_config_from_args(args),
        speculative_config=_speculative_config(args),
        engine_threads=getattr(args, "engine_threads", None),  # a serve flag only
    )


def _speculative_config(args: argparse.Namespace):
    """The parsed --speculative-config: a draft model is checked against the
    target, and the method refused unless this build serves it."""
    from inference.spec_decode.config import SpeculativeConfig

    if args.speculative_config is None:
        return None
    config = SpeculativeConfig.from_json(args.speculative_config)
    if config.method == "draft_model":
        from inference.prepare import default_model_dir
        from inference.spec_decode.draft_check import check_draft_model

        check_draft_model(config.model, args.model or str(default_model_dir()))
    config.check_served()
    return config


def _kv_events_config(args: argparse.Namespace):
    from inference.kv_events_config import KVEventsConfig

    text = getattr(args, "kv_events_config", None)  # a serve flag only
    return None if text is None else KVEventsConfig.from_json(text)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags that argparse cannot check, or None."""
    from inference.block_hashing import HASH_ALGOS

    if args.prefix_caching_hash_algo not in HASH_ALGOS:
        return (f"argument --prefix-caching-hash-algo: unknown algorithm {args.prefix_caching_hash_algo!r} "
                f"(choose from {', '.join(HASH_ALGOS)})")
    from server.tracing_config import check_tracing, tracing_endpoint

    endpoint = tracing_endpoint(getattr(args, "otlp_traces_endpoint", None))  # a serve flag only
    if endpoint is not None:
        problem = check_tracing(endpoint)
        if problem is not None:
            return f"argument --otlp-traces-endpoint: {problem}"
    try:
        lora_config_from_args(args)
    except ValueError as exc:
        return str(exc)
    try:
        _speculative_config(args)
    except ValueError as exc:
        return f"argument --speculative-config: {exc}"
    try:
        config = _kv_events_config(args)
    except ValueError as exc:
        return f"argument --kv-events-config: {exc}"
    if config is not None and config.enabled:
        import zmq

        from inference.kv_events_publisher import open_sockets

        # Bound here and let go at once: the engine core binds them again once loaded.
        context = zmq.Context()
        try:
            for socket in open_sockets(context, config):
                if socket is not None:
                    socket.close(linger=0)
        except ValueError as exc:
            return f"argument --kv-events-config: {exc}"
        finally:
            context.term()
    return None


def build_core(args: argparse.Namespace):
    """The engine core for `serve`. It runs in the core process, which gets
    it pickled: keep it a module-level function of plain arguments."""
    from inference.engine_core import EngineCore

    return EngineCore(engine_config_from_args(args))


def _prepare_model(args: argparse.Namespace) -> int:
    from inference.prepare import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from inference import LLM, SamplingParams

    config = engine_config_from_args(args)
    print(config.describe_dtype(), file=sys.stderr)
    llm = LLM.from_config(config)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    [output] = llm.generate([args.prompt], params, use_tqdm=False)
    print(output.outputs[0].text)
    return 0


def _plan(args: argparse.Namespace) -> int:
    """`pagedinfer plan`: one clear line and exit code 2 when the folder or the sizes are wrong."""
    try:
        lines = _memory_plan(args).describe()
    except (ValueError, OSError) as exc:
        print(f"pagedinfer plan: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _memory_plan(args: argparse.Namespace):
    from transformers import AutoConfig

    from inference.config import EngineConfig
    from inference.memory_plan import GIB, plan
    from inference.parallel.layers import check_tensor_parallel

    if args.device_memory is not None and args.device_memory <= 0 or (args.kv_cache_memory or 1) <= 0:
        raise ValueError("--device-memory and --kv-cache-memory must be positive")
    on_gpu = args.device_memory is not None
    kv_cache_memory = None if on_gpu else int((args.kv_cache_memory or 2) * GIB)
    # The serve defaults (max_model_len, batch limits, dtype "auto") for that device; the
    # tensor-parallel check without the GPUs this machine may not have.
    config = EngineConfig.create(
        model=args.model, dtype=args.dtype, device="cuda" if on_gpu else "cpu", block_size=args.block_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization if on_gpu else None,
    )
    hf_config = AutoConfig.from_pretrained(config.model)
    if args.tensor_parallel_size > 1:
        check_tensor_parallel(hf_config, args.tensor_parallel_size)
    return plan(hf_config, dtype=config.dtype, device=config.device, block_size=config.block_size,
                max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                tensor_parallel_size=args.tensor_parallel_size, kv_cache_memory=kv_cache_memory,
                device_memory=int(args.device_memory * GIB) if on_gpu else None,
                gpu_memory_utilization=args.gpu_memory_utilization)


def _serve(args: argparse.Namespace) -> int:
    import functools
    import threading

    from inference.core_spawn import spawn_core, tokenizer_class
    from inference.prepare import known_model_dir

    # The core first: it imports torch and loads the model while this
    # process imports the server stack. The core process gets the factory
    # pickled: only plain values go, not the subcommand's function, which may
    # live in __main__.
    engine_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    core = spawn_core(functools.partial(build_core, engine_args))
    # The tokenizer's import starts now too, beside the server stack's (the
    # app loads the tokenizer itself once its stack is in).
    folder = known_model_dir(args.model)
    if folder is not None:
        threading.Thread(target=tokenizer_class, args=(folder,), name="import-tokenizer", daemon=True).start()
    from server.api_server import run_server

    return run_server(args, core)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedinfer")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-model", help="fetch and convert the default SmolLM2 model")
    prep.add_argument("--force", action="store_true", help="rebuild even if the folder looks fine")
    prep.set_defaults(func=_prepare_model)

    gen = sub.add_parser("generate", help="greedy text from one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=32)
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    plan = sub.add_parser("plan", help="the memory plan of a model, without loading it")
    plan.add_argument("--model", required=True, help="Hugging Face folder (config.json is all it reads)")
    plan.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    plan.add_argument("--max-model-len", type=int, default=None)
    plan.add_argument("--max-num-seqs", type=int, default=None)
    plan.add_argument("--max-num-batched-tokens", type=int, default=None)
    plan.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64])
    plan.add_argument("--tensor-parallel-size", type=int, default=1)
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                        help="plan for a GPU with this much memory per rank, in GiB")
    budget.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                        help="plan for this KV cache budget per rank, in GiB (the CPU's way; default 2)")
    plan.set_defaults(func=_plan)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(serve)
    serve.add_argument(
        "--engine-threads", type=_engine_threads, default="auto", metavar="{auto,N}",
        help="torch threads of a CPU engine: auto (default) times a decode step with every core and with one "
             "fewer at start-up and leaves the front end a core unless the engine is 1.25x faster with it",
    )
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--max-queued-requests", type=int, default=256)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0)
    serve.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--metrics-compat", choices=["none", "vllm"], default="none")
    serve.add_argument("--log-prompts", action="store_true", help="log prompt text (off by default)")
    serve.add_argument("--disable-console", action="store_true", help="no web console at / and no /debug/*")
    serve.add_argument(
        "--allow-runtime-lora-updating", action="store_true",
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (as VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    )
    serve.add_argument(
        "--kv-events-config", default=None, metavar="JSON",
        help='publish KV-cache events for routers, vLLM\'s JSON: {"enable_kv_cache_events": true, '
             '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "kv@pod@model"}',
    )
    serve.add_argument(
        "--otlp-traces-endpoint", default=None, metavar="URL",
        help="export a trace span per request over OTLP to this collector (grpc by default: "
             "http://collector:4317; OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf: http://collector:4318); "
             "the standard OTEL_* variables apply",
    )
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("generate", "serve"):
        problem = check_args(args)
        if problem is not None:
            parser.exit(2, f"pagedinfer {args.command}: error: {problem}\n")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
