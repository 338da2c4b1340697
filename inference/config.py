"""Engine configuration, resolved once at start-up.

`SchedulerConfig` is plain data so the scheduler stays importable without
torch; `EngineConfig.create` is where defaults are filled in from the model's
Hugging Face config and the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference.block_hashing import HASH_ALGOS
from inference.kv_events_config import KVEventsConfig
from inference.lora.config import LoRAConfig
from inference.spec_decode.config import SpeculativeConfig

DTYPES = ("float32", "float16", "bfloat16")
# "dummy": random weights built on the device, no weight files read (benchmarks
# of shapes too large to write to disk; outputs are meaningless).
LOAD_FORMATS = ("safetensors", "dummy")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256_cbor"  # one of inference.block_hashing.HASH_ALGOS
    # Distinct LoRA adapters one step may hold (the device slots); 0: LoRA is off.
    max_loras: int = 0
    # Draft tokens a request may verify per step; 0: speculative decoding is off.
    num_speculative_tokens: int = 0
    # No drafts in a step that starts with at least this many requests running; None: always.
    spec_disable_by_batch_size: int | None = None


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str  # one of DTYPES
    device: str  # "cpu" or "cuda"
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    # False: decode-only batches are padded to a bucket and, on CUDA, replayed
    # as CUDA graphs; on the CPU nothing is captured and the padded batch runs
    # eagerly (the tests' way to check padding). create() picks False on CUDA
    # and True on the CPU unless told.
    enforce_eager: bool = False
    # The decode batch sizes captured (inference/cuda_graphs.py), vLLM's
    # options: an explicit list, and the largest one; None: the default ladder
    # up to max_num_seqs. Each is a capture at start-up.
    max_cudagraph_capture_size: int | None = None
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    load_format: str = "safetensors"  # one of LOAD_FORMATS
    # Ranks the model is split across (inference/parallel/): one process and,
    # on CUDA, one GPU each. kv_cache_memory is then per rank.
    tensor_parallel_size: int = 1
    # How `dtype` was chosen, for the start-up log.
    dtype_reason: str = "asked for"
    prefix_caching_hash_algo: str = "sha256_cbor"  # one of inference.block_hashing.HASH_ALGOS
    # KV-cache events for routers (inference/kv_events_config.py); None: off.
    kv_events: KVEventsConfig | None = None
    # Multi-LoRA serving (inference/lora/); None: off.
    lora: LoRAConfig | None = None
    # Speculative decoding (inference/spec_decode/); None: off.
    speculative: SpeculativeConfig | None = None
    # torch threads of a CPU engine (inference/cpu_threads.py): a count; "auto",
    # measured at start-up leaving the front end a core unless the engine needs
    # it (serve's default); None: torch's default, one a core (offline).
    engine_threads: int | str | None = None

    @classmethod
    def create(
        cls,
        model: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        max_cudagraph_capture_size: int | None = None,
        cudagraph_capture_sizes: list[int] | tuple[int, ...] | None = None,
        load_format: str = "safetensors",
        tensor_parallel_size: int = 1,
        prefix_caching_hash_algo: str = "sha256_cbor",
        kv_events: KVEventsConfig | None = None,
        lora: LoRAConfig | None = None,
        speculative_config: SpeculativeConfig | dict | None = None,
        engine_threads: int | str | None = None,
    ) -> EngineConfig:
        import torch
        from transformers import AutoConfig

        from inference.prepare import prepare_default_model

        path = Path(model) if model is not None else prepare_default_model()
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json")
        hf_config = AutoConfig.from_pretrained(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_reason = "asked for"
        if dtype == "auto":
            dtype, dtype_reason = auto_dtype(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or 'auto', got {dtype!r}")
        if prefix_caching_hash_algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {HASH_ALGOS}, got {prefix_caching_hash_algo!r}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
        if block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be 8, 16, 32 or 64, got {block_size}")
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        if max_model_len is None:
            max_model_len = model_max
        elif not 1 <= max_model_len <= model_max:
            raise ValueError(f"max_model_len must be in [1, {model_max}], got {max_model_len}")
        on_gpu = device == "cuda"
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if on_gpu and tensor_parallel_size > 1 and tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} needs as many GPUs; {torch.cuda.device_count()} visible"
            )
        if tensor_parallel_size > 1:
            from inference.parallel.layers import check_tensor_parallel

            check_tensor_parallel(hf_config, tensor_parallel_size)
            # Decode graphs would capture NCCL collectives, which every rank
            # would have to capture and replay in lockstep: not done.
            if on_gpu:
                enforce_eager = True
        if enforce_eager is None:
            enforce_eager = not on_gpu
        max_num_seqs = max_num_seqs or (256 if on_gpu else 64)
        max_num_batched_tokens = max_num_batched_tokens or (8192 if on_gpu else 512)
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if max_cudagraph_capture_size is not None and max_cudagraph_capture_size < 1:
            raise ValueError(f"max_cudagraph_capture_size must be >= 1, got {max_cudagraph_capture_size}")
        if cudagraph_capture_sizes is not None:
            cudagraph_capture_sizes = tuple(cudagraph_capture_sizes)
            if not cudagraph_capture_sizes or min(cudagraph_capture_sizes) < 1:
                raise ValueError(f"cudagraph_capture_sizes must be sizes >= 1, got {list(cudagraph_capture_sizes)}")
        if gpu_memory_utilization is not None and not on_gpu:
            raise ValueError("gpu_memory_utilization needs a GPU; on the CPU give kv_cache_memory or num_kv_blocks")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if on_gpu and num_kv_blocks is None and kv_cache_memory is None and gpu_memory_utilization is None:
            gpu_memory_utilization = 0.9
        if not on_gpu and num_kv_blocks is None and kv_cache_memory is None:
            kv_cache_memory = 2 * 1024**3
        if lora is not None and hf_config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"LoRA adapters are served on Llama, Mistral, Qwen2 and Qwen3 models, not {hf_config.model_type}")
        if isinstance(speculative_config, dict):
            speculative_config = SpeculativeConfig.from_dict(speculative_config)
        if speculative_config is not None:
            if speculative_config.method == "draft_model":
                from inference.spec_decode.draft_check import check_draft_model

                check_draft_model(speculative_config.model, str(path))
            speculative_config.check_served()
        if engine_threads is not None and engine_threads != "auto" and not (
                isinstance(engine_threads, int) and engine_threads >= 1):
            raise ValueError(f"engine_threads must be 'auto' or a count >= 1, got {engine_threads!r}")
        if on_gpu or tensor_parallel_size > 1:
            # A GPU step's host threads are not the bottleneck; tensor-parallel ranks
            # take rank 0's count at spawn, before a model exists to measure.
            engine_threads = None if engine_threads == "auto" else engine_threads
        return cls(
            model=str(path),
            dtype=dtype,
            device=device,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            max_cudagraph_capture_size=max_cudagraph_capture_size,
            cudagraph_capture_sizes=cudagraph_capture_sizes,
            load_format=load_format,
            tensor_parallel_size=tensor_parallel_size,
            dtype_reason=dtype_reason,
            prefix_caching_hash_algo=prefix_caching_hash_algo,
            kv_events=kv_events if kv_events is not None and kv_events.enabled else None,
            lora=lora,
            speculative=speculative_config,
            engine_threads=engine_threads,
        )

    def describe_dtype(self) -> str:
        return f"dtype {self.dtype} on {self.device}: {self.dtype_reason}"

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            prefix_caching_hash_algo=self.prefix_caching_hash_algo,
            max_loras=self.lora.max_loras if self.lora is not None else 0,
            num_speculative_tokens=self.speculative.num_speculative_tokens if self.speculative is not None else 0,
            spec_disable_by_batch_size=self.speculative.disable_by_batch_size if self.speculative is not None else None,
        )


def cpu_bf16_instructions() -> str | None:
    """The name of this CPU's native bfloat16 matrix instructions, or None."""
    import torch

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def auto_dtype(device: str) -> tuple[str, str]:
    """`dtype="auto"`: (dtype, why). bfloat16 on GPUs and on CPUs with native
    bf16 matrix instructions; float32 on other CPUs, where bf16 matmuls are
    emulated (measured ~3x slower than float32 at batch 48 on an AVX-512 Xeon
    without them)."""
    if device == "cuda":
        return "bfloat16", "auto: the GPU serving default"
    instructions = cpu_bf16_instructions()
    if instructions:
        return "bfloat16", f"auto: the CPU has native bf16 ({instructions})"
    return "float32", "auto: the CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated and slower"
