"""Flags and their environment twins become one Config."""

from __future__ import annotations

import pytest

from tgserve.cli import build_parser, config_from_args


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(build_parser(environ or {}).parse_args(["serve", *argv]))


def test_defaults_follow_tgi():
    cfg = parse([])
    assert cfg.server.port == 3000 and cfg.server.hostname == "0.0.0.0"
    assert cfg.server.max_concurrent_requests == 128 and cfg.server.max_best_of == 2
    assert cfg.server.max_stop_sequences == 4 and cfg.server.max_top_n_tokens == 5
    assert cfg.scheduler.max_waiting_tokens == 20
    assert cfg.model.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_environment_variables_set_flags():
    cfg = parse([], {"MODEL_ID": "/models/x", "MAX_CONCURRENT_REQUESTS": "7", "JSON_OUTPUT": "true",
                     "MAX_BATCH_PREFILL_TOKENS": "64", "WAITING_SERVED_RATIO": "0.5", "DTYPE": "bfloat16"})
    assert cfg.model.model_id == "/models/x" and cfg.model.dtype == "bfloat16"
    assert cfg.server.max_concurrent_requests == 7 and cfg.server.json_output is True
    assert cfg.scheduler.max_batch_prefill_tokens == 64 and cfg.scheduler.waiting_served_ratio == 0.5


def test_flags_win_over_environment():
    cfg = parse(["--port", "8080"], {"PORT": "9000"})
    assert cfg.server.port == 8080


def test_unknown_dtype_is_refused():
    with pytest.raises(SystemExit):
        parse(["--dtype", "int3"])


def test_shard_flags_and_torch_distributed_environment():
    cfg = parse(["--num-shard", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                 "--master-port", "29400"])
    assert (cfg.shard.num_shard, cfg.shard.nnodes, cfg.shard.node_rank) == (4, 2, 1)
    assert cfg.shard.master_addr == "10.0.0.1" and cfg.shard.master_port == 29400
    assert list(cfg.shard.local_ranks) == [2, 3]
    # one `tgserve serve` per rank, each on its own host: torch.distributed's variables
    cfg = parse([], {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29401"})
    assert (cfg.shard.num_shard, cfg.shard.nnodes, cfg.shard.node_rank) == (2, 2, 1)
    assert list(cfg.shard.local_ranks) == [1] and cfg.shard.master_port == 29401
    assert parse([], {"WORLD_SIZE": "2"}).shard.nnodes == 1  # both ranks on this host


@pytest.mark.parametrize("argv, message", [
    (["--sharded"], "--sharded on CPU needs --num-shard"),
    (["--sharded", "--num-shard", "1"], "--sharded needs more than one shard"),
    (["--num-shard", "3", "--nnodes", "2"], "--num-shard (3) must be a multiple of --nnodes (2)"),
    (["--num-shard", "2", "--nnodes", "2", "--node-rank", "2"], "--node-rank must be in [0, 2)"),
])
def test_shard_layouts_that_cannot_work_are_refused(argv, message):
    from tgserve.config import ConfigError
    from tgserve.launcher import resolve_shard

    with pytest.raises(ConfigError) as e:
        resolve_shard(parse(argv).shard, "cpu")
    assert message in str(e.value)


def test_one_host_rendezvous_on_a_free_port_by_default():
    from tgserve.launcher import resolve_shard

    one = resolve_shard(parse(["--num-shard", "2"]).shard, "cpu")
    assert one.num_shard == 2 and one.master_port not in (None, 29500)
    assert resolve_shard(parse(["--num-shard", "2", "--nnodes", "2"]).shard, "cpu").master_port == 29500
    assert resolve_shard(parse([]).shard, "cpu").num_shard == 1


def test_convert_without_arguments_prepares_the_default_model(smollm2_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tgserve", "convert"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == smollm2_dir


def test_prefix_caching_is_on_unless_turned_off_by_flag_or_environment():
    assert parse([]).cache.prefix_caching is True
    assert parse(["--no-prefix-caching"]).cache.prefix_caching is False
    assert parse([], {"PREFIX_CACHING": "0"}).cache.prefix_caching is False
    assert parse(["--prefix-caching"], {"PREFIX_CACHING": "false"}).cache.prefix_caching is True


def test_prompts_are_grouped_per_step_on_cpu_by_default_and_the_group_is_a_flag(smollm2_dir):
    from tgserve.config import ConfigError
    from tgserve.launcher import CPU_PREFILL_GROUP_TOKENS, resolve

    assert parse([]).scheduler.prefill_group_tokens is None  # resolved with the machine
    resolved = resolve(parse(["--model-id", smollm2_dir, "--device", "cpu"]))
    assert resolved.scheduler.prefill_group_tokens == CPU_PREFILL_GROUP_TOKENS == 64
    assert resolved.scheduler.max_batch_prefill_tokens == 512
    assert parse(["--prefill-group-tokens", "32"]).scheduler.prefill_group_tokens == 32
    assert parse([], {"PREFILL_GROUP_TOKENS": "100"}).scheduler.prefill_group_tokens == 100
    with pytest.raises(ConfigError):
        resolve(parse(["--model-id", smollm2_dir, "--device", "cpu", "--prefill-group-tokens", "0"]))


def test_cuda_graphs_flag_and_its_environment_twin_are_read_and_a_bad_list_refused(smollm2_dir):
    from tgserve.config import ConfigError, cuda_graph_sizes
    from tgserve.launcher import resolve

    assert cuda_graph_sizes(parse([]).model.cuda_graphs) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert cuda_graph_sizes(parse(["--cuda-graphs", "1,2,4"]).model.cuda_graphs) == (1, 2, 4)
    assert cuda_graph_sizes(parse([], {"CUDA_GRAPHS": "0"}).model.cuda_graphs) == ()
    with pytest.raises(ConfigError, match="--cuda-graphs"):
        resolve(parse(["--model-id", smollm2_dir, "--device", "cpu", "--cuda-graphs", "1,x"]))
