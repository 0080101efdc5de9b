"""The `ember` command: serve, complete, chat; engine flags are built from the config dataclasses' fields."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.sampling_params import SamplingParams

ENGINE_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One kebab-case flag per engine config field, its default read from the dataclass."""
    group = parser.add_argument_group("engine")
    hints = {}
    for cls in ENGINE_SECTIONS + (EngineConfig,):
        hints.update(typing.get_type_hints(cls))
    for cls in ENGINE_SECTIONS + (EngineConfig,):
        for f in dataclasses.fields(cls):
            if f.name == "model" or f.name in ("cache", "scheduler"):
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
                group.add_argument(flag, type=base, default=default, help=f"(default: {default})")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for cls in ENGINE_SECTIONS + (EngineConfig,) for f in dataclasses.fields(cls)}
    options = {k: v for k, v in vars(args).items() if k in names and k not in ("cache", "scheduler")}
    return EngineConfig.from_flat(**options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: a self-hosted LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="one completion of a prompt, printed to stdout")
    complete.add_argument("prompt")
    complete.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder or hub id (default: embedded SmolLM2)")
    complete.add_argument("--max-tokens", type=int, default=64)
    complete.add_argument("--temperature", type=float, default=0.0)
    complete.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_engine_flags(complete)

    args = parser.parse_args(argv)
    if args.command == "complete":
        return run_complete(args)
    return 2


def run_complete(args: argparse.Namespace) -> int:
    from ember.llm import LLM

    llm = LLM(config=engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        output = llm.generate(args.prompt, params)[0]
    sys.stdout.write(output.outputs[0].text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
