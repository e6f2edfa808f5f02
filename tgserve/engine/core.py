"""The engine process: drain inbox → schedule → execute → update → send outbox, forever.

When idle it blocks on its inbox; when work is pending it only polls it, so requests and aborts
join between steps and the model loop never waits on the API.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass

import torch
import zmq
from torch import nn

from tgserve import distributed as dist
from tgserve import hardware
from tgserve.config import Config, cuda_graph_sizes
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine import fallback
from tgserve.engine.inputs import StepInputs
from tgserve.engine.profile import StepProfile
from tgserve.engine.runner import GroupFailed, ModelRunner, kv_bytes_per_token, plan_num_blocks
from tgserve.engine.scheduler import Scheduler
from tgserve.params import SamplingParams, StoppingParams
from tgserve.process import become_child
from tgserve.sampling.sampler import SampledTokens, Sampler
from tgserve.protocol import (Abort, AddRequest, EngineFailed, Ready, SeqOutput, Shutdown, StepOutputs, ToApi,
                              ToEngine, decode_to_engine, encode, to_api_address, to_engine_address)
from tgserve.models.registry import UnsupportedModel
from tgserve.weights.loader import load_model

log = logging.getLogger("tgserve.engine")

IDLE_POLL_MS = 100


class EngineChannel:
    """The engine's ends of the two sockets (the API binds them)."""

    def __init__(self, ipc_dir: str):
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.connect(to_engine_address(ipc_dir))
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.connect(to_api_address(ipc_dir))

    def receive(self, timeout_ms: int) -> list[ToEngine]:
        messages = []
        if self._inbox.poll(timeout_ms):
            while True:
                try:
                    messages.append(decode_to_engine(self._inbox.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return messages

    def send(self, message: ToApi) -> None:
        self._outbox.send(encode(message))

    def close(self, linger_ms: int = 1000) -> None:
        self._inbox.close(0)
        self._outbox.close(linger_ms)
        self._ctx.term()


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner):
        self.scheduler, self.runner = scheduler, runner
        self.stopping = False
        self.refused: list[SeqOutput] = []  # requests failed on arrival, sent with the next outputs

    def handle(self, message: ToEngine) -> None:
        if isinstance(message, AddRequest):
            try:
                self.runner.admit(message.request_id, message.sampling, message.generated_ids)
            except Exception as e:  # e.g. a grammar this engine cannot build: fail the request alone
                log.exception("request %s refused", message.request_id)
                error = f"{type(e).__name__}: {e}"
                self.refused.extend(SeqOutput(r, error=error) for r in
                                    [message.request_id, *(s.request_id for s in message.siblings)])
                return
            self.scheduler.add(message)
        elif isinstance(message, Abort):
            self.scheduler.abort(message.request_ids)
        elif isinstance(message, Shutdown):
            self.stopping = True

    def step(self) -> StepOutputs:
        start = time.perf_counter()
        profile = StepProfile()
        plan = self.scheduler.schedule()
        profile.mark("schedule")
        try:
            sampled = self.runner.execute(plan, profile) if plan.scheduled else SampledTokens([], [])
            profile.mark("forward")  # what the runner did not charge to a phase of its own
            outputs = self.scheduler.update(plan, sampled)
        except GroupFailed:
            raise
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("step failed; failing its %d requests", len(plan.scheduled))
            outputs = self.scheduler.fail(plan, f"{type(e).__name__}: {e}")
        self.runner.release(self.scheduler.pop_finished())
        outputs, self.refused = self.refused + outputs, []
        profile.mark("update")
        stats = self.scheduler.stats(plan.num_batched_tokens, time.perf_counter() - start, profile.seconds)
        return StepOutputs(outputs, stats)

    def run(self, channel: EngineChannel) -> None:
        stalled = False  # the last step could schedule nothing: wait for news instead of spinning
        while not self.stopping:
            busy = self.scheduler.has_work() and not stalled
            messages = channel.receive(0 if busy else IDLE_POLL_MS)
            for message in messages:
                self.handle(message)
            if self.scheduler.has_work():
                outputs = self.step()
                stalled = outputs.stats.num_batched_tokens == 0 and not outputs.outputs
                if not stalled or messages:
                    channel.send(outputs)
            elif messages:  # e.g. aborts freed blocks: let the API's gauges see it
                self.runner.release(self.scheduler.pop_finished())
                outputs, self.refused = self.refused, []
                channel.send(StepOutputs(outputs, self.scheduler.stats()))
            else:
                self.runner.keep_alive()

    def warmup(self) -> None:
        """One short request through the real path, so the first user does not pay for first use."""
        self.scheduler.add(AddRequest("warmup", list(range(1, 17)), SamplingParams(),
                                      StoppingParams(max_new_tokens=2, ignore_eos=True), time.time()))
        while self.scheduler.has_work():
            outputs = self.step().outputs
            if any(o.error for o in outputs):
                raise RuntimeError(f"warmup failed: {outputs[0].error}")
        assert self.scheduler.kv.num_free_blocks == self.scheduler.kv.pool.num_usable


@dataclass
class Loaded:
    """What every rank builds: its part of the model (None: the transformers fallback) and the KV plan."""

    model: nn.Module | None
    hf_config: object
    implementation: str
    device: torch.device
    dtype_name: str
    num_blocks: int


def load_rank(config: Config, rank: int) -> Loaded:
    """Load this rank's part of the model and size its KV cache (the same block count on every rank)."""
    shard = config.shard
    local = rank - shard.local_ranks.start
    device = torch.device(config.model.device or hardware.default_device())
    if device.type == "cuda" and shard.num_shard > 1:
        device = torch.device("cuda", local)  # one GPU per rank, among the visible ones
        torch.cuda.set_device(device)
    elif device.type == "cpu" and len(shard.local_ranks) > 1:
        torch.set_num_threads(max(1, hardware.cpu_cores() // len(shard.local_ranks)))  # the host's cores, shared
    dtype_name = config.model.dtype or hardware.default_dtype(device.type)
    dtype = hardware.TORCH_DTYPES[dtype_name]
    max_total = config.server.max_total_tokens
    try:
        model, hf_config = load_model(config.model.path, dtype, device, max_total, config.model.quantize)
        implementation, bytes_per_token = "native", kv_bytes_per_token(model, dtype)
    except UnsupportedModel as unsupported:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(config.model.path)
        if not fallback.supports(hf_config):
            raise UnsupportedModel(f"{unsupported}; transformers cannot load it as a causal LM either") from None
        quantized = getattr(hf_config, "quantization_config", None) is not None
        if config.model.quantize is not None or quantized:
            raise UnsupportedModel(f"{unsupported}: --quantize and pre-quantized checkpoints need a natively "
                                   "served model")
        if shard.num_shard > 1:
            raise UnsupportedModel(f"{unsupported}: --num-shard needs a natively served model")
        model, implementation = None, "transformers"
        bytes_per_token = fallback.kv_bytes_per_token(hf_config, dtype)
    block_size = config.cache.block_size
    # the KV cache's share of free memory, split between the ranks that share this host's memory
    fraction = 0.8 if device.type == "cuda" else 0.2 / len(shard.local_ranks)
    num_blocks = plan_num_blocks(bytes_per_token, block_size, config.cache.max_batch_total_tokens,
                                 hardware.available_memory_bytes(device.type), fraction)
    num_blocks = dist.min_over_ranks(num_blocks)
    if (num_blocks - 1) * block_size < max_total:
        raise ValueError(f"the KV cache holds {(num_blocks - 1) * block_size} tokens, "
                         f"fewer than max_total_tokens ({max_total})")
    return Loaded(model, hf_config, implementation, device, dtype_name, num_blocks)


def create_engine(config: Config) -> tuple[EngineCore, Ready]:
    """Rank 0: the model runner with its sampler, the scheduler, warmed up."""
    loaded = load_rank(config, 0)
    model, hf_config, device = loaded.model, loaded.hf_config, loaded.device
    dtype = hardware.TORCH_DTYPES[loaded.dtype_name]
    log.info("%s serves %s", "our own implementation" if model is not None else "the transformers fallback",
             getattr(hf_config, "architectures", None))
    block_size, num_blocks = config.cache.block_size, loaded.num_blocks
    sampler = Sampler(hf_config.vocab_size, device, grammar=_grammar_backend(config.model.path, hf_config.vocab_size),
                      watermark_gamma=config.sampling.watermark_gamma,
                      watermark_delta=config.sampling.watermark_delta)
    if model is not None:
        # CUDA graphs replay one GPU's kernels: a sharded step's collectives stay eager
        graph_sizes = ()
        if device.type == "cuda" and config.shard.num_shard == 1:
            graph_sizes = cuda_graph_sizes(config.model.cuda_graphs)
        runner = ModelRunner(model, num_blocks, block_size, dtype, device, sampler, graph_sizes)
        if config.shard.num_shard > 1:
            runner.broadcast = dist.broadcast_object
    else:
        runner = fallback.FallbackRunner(config.model.path, dtype, device, sampler)
    # an encoder-decoder (native or fallback) names its decoder's start token
    decoder_start = getattr(model if model is not None else runner, "decoder_start_token_id", None)
    # prefix caching shares paged blocks: the fallback keeps its own cache, an encoder-decoder's
    # K/V depend on its encoder (KVCacheManager.match_prefix skips those sequences)
    prefix_caching = config.cache.prefix_caching and model is not None
    scheduler = Scheduler(config.scheduler, KVCacheManager(num_blocks, block_size, prefix_caching),
                          getattr(hf_config, "max_position_embeddings", None) or config.server.max_total_tokens,
                          decoder_start)
    core = EngineCore(scheduler, runner)
    core.warmup()
    ready = Ready(num_blocks=num_blocks - 1, block_size=block_size,
                  max_batch_total_tokens=(num_blocks - 1) * block_size, dtype=loaded.dtype_name, device=device.type,
                  implementation=loaded.implementation, encoder_decoder=decoder_start is not None)
    return core, ready


def create_follower(config: Config, rank: int) -> ModelRunner:
    """A rank other than 0: its part of the model and of the KV cache, no sampler."""
    loaded = load_rank(config, rank)
    return ModelRunner(loaded.model, loaded.num_blocks, config.cache.block_size,
                       hardware.TORCH_DTYPES[loaded.dtype_name], loaded.device)


def follow(runner: ModelRunner) -> None:
    """A rank other than 0: compute every step rank 0 sends, until it sends the end."""
    while True:
        step = dist.broadcast_object()
        if step is None:
            return
        if isinstance(step, StepInputs):
            runner.forward(step)


def _grammar_backend(folder: str, vocab_size: int):
    """llguidance over the model's tokenizer.json; None (grammars refused) when there is none."""
    from tgserve.grammars import load_tokenizer
    from tgserve.sampling.grammar import LLGuidanceBackend
    from tgserve.weights.locate import generation_eos_ids

    eos = sorted(generation_eos_ids(folder))
    tokenizer = load_tokenizer(folder, vocab_size, eos)
    if tokenizer is None:
        return None
    return LLGuidanceBackend(tokenizer, vocab_size, eos or [tokenizer.eos_token])


def engine_main(config: Config, rank: int = 0) -> None:
    """Entry point of an engine process (started by the launcher). Rank 0 talks to the API; the
    other ranks of a sharded engine only follow rank 0's steps."""
    become_child(config.server.json_output)
    shard = config.shard
    channel = EngineChannel(config.ipc_dir) if rank == 0 else None
    try:
        dist.init(rank, shard.num_shard, init_method=f"tcp://{_host(shard.master_addr)}:{shard.master_port}")
        if rank == 0:
            core, ready = create_engine(config)
        else:
            runner = create_follower(config, rank)
    except Exception as e:
        log.exception("engine rank %d failed to start", rank)
        if channel is not None:
            channel.send(EngineFailed(f"engine failed to start: {type(e).__name__}: {e}"))
            channel.close()
        sys.exit(1)

    if rank != 0:  # stopped by rank 0 (or killed with the group): SIGTERM keeps its default
        try:
            follow(runner)
        except Exception:
            log.exception("engine rank %d lost the group", rank)
            sys.exit(1)
        dist.shutdown()
        log.info("engine rank %d stopped", rank)
        return

    def on_sigterm(signum, frame):  # the launcher stops us after the API has drained
        core.stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    log.info("engine ready: %d KV blocks of %d tokens, %s on %s%s; %d intra-op threads%s", ready.num_blocks,
             ready.block_size, ready.dtype, ready.device, f", {shard.num_shard} ranks" if shard.num_shard > 1 else "",
             torch.get_num_threads(), " per rank" if shard.num_shard > 1 else "")
    channel.send(ready)
    try:
        core.run(channel)
        if shard.num_shard > 1:
            dist.broadcast_object(None)  # the other ranks stop too
    except GroupFailed as e:
        log.error("%s", e)
        channel.send(EngineFailed(str(e)))
        channel.close()
        sys.exit(1)
    channel.close(linger_ms=0)
    dist.shutdown()
    log.info("engine stopped")


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
