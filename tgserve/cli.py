"""The `tgserve` command: flags (TGI's names) with environment fallbacks → one Config.

The only module that reads flags and the environment. Every `serve` flag comes from a config
field's metadata; its environment twin is the flag name in UPPER_SNAKE_CASE (`--model-id` →
MODEL_ID), as with TGI's launcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Mapping

from tgserve.config import DEFAULT_MODEL_ID, DTYPES, QUANTIZE, SECTIONS, Config, ModelConfig

_TRUE = {"1", "true", "yes", "on"}


def env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def _base_type(hint: Any) -> type:
    """`int | None` → int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _settings() -> list[tuple[str, dataclasses.Field, type]]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag"):
                out.append((section, f, _base_type(hints[f.name])))
    return out


def add_serve_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    for _, f, kind in _settings():
        flag, env = f.metadata["flag"], env_name(f.metadata["flag"])
        help_text = f"{f.metadata['help']} [env: {env}] [default: {f.default}]"
        raw = environ.get(env)
        if kind is bool:
            default = raw.lower() in _TRUE if raw is not None else f.default
            # a setting that is on by default is turned off with --no-<flag>
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
            continue
        choices = {"dtype": DTYPES, "quantize": QUANTIZE}.get(f.name)
        default = kind(raw) if raw is not None else f.default
        parser.add_argument(flag, dest=f.name, type=kind, default=default, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, f, _ in _settings():
        sections[section][f.name] = getattr(args, f.name)
    return Config(**{name: SECTIONS[name](**values) for name, values in sections.items()})


def rendezvous_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's standard variables as defaults for our flags: WORLD_SIZE is the number of
    shards, and with RANK (one `tgserve serve` per rank, each on its own host) the hosts are the
    ranks: NNODES = WORLD_SIZE, NODE_RANK = RANK."""
    env = dict(environ)
    if "WORLD_SIZE" in env:
        env.setdefault("NUM_SHARD", env["WORLD_SIZE"])
        if "RANK" in env:
            env.setdefault("NNODES", env["WORLD_SIZE"])
            env.setdefault("NODE_RANK", env["RANK"])
    return env


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = rendezvous_environment(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(prog="tgserve", description="Text-generation inference server (TGI's API).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server (API + engine) on a model")
    add_serve_flags(serve, environ)
    convert = sub.add_parser("convert", help="prepare a model for serving (convert a GGUF or a .bin checkpoint to safetensors, "
                                                "once) and print its folder")
    convert.add_argument("--model-id", default=environ.get("MODEL_ID", DEFAULT_MODEL_ID))
    convert.add_argument("--cache-dir", default=environ.get("CACHE_DIR"))
    sub.add_parser("version", help="print the version")
    sub.add_parser("bench", add_help=False, help="benchmark a server over a concurrency sweep "
                                                  "(`tgserve bench --help` lists its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options (tgserve/benchmark/sweep.py)
        from tgserve.benchmark.sweep import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "version":
        from tgserve import __version__

        print(__version__)
        return 0
    if args.command == "convert":
        from tgserve.config import ConfigError
        from tgserve.process import setup_logging
        from tgserve.weights.locate import ModelNotFound, locate_model

        setup_logging(False)
        try:
            print(locate_model(ModelConfig(model_id=args.model_id, cache_dir=args.cache_dir)))
        except (ModelNotFound, ConfigError) as e:  # no model there, or one that cannot be converted
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from tgserve.launcher import serve

    return serve(config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
