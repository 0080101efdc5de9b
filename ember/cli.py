"""The `ember` command: serve, chat, complete; engine and server flags are built from the config dataclasses' fields."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import sys
import typing
import urllib.error
import urllib.request

from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig, SpeculativeConfig
from ember.sampling_params import SamplingParams

ENGINE_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, SpeculativeConfig)
SECTION_FIELDS = ("cache", "scheduler", "speculation")  # EngineConfig's nested sections, not flags


# llama.cpp's spellings for the same settings, for users coming from it
FLAG_ALIASES = {"num_threads": ("--threads", "-t")}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One kebab-case flag per engine config field, its default read from the dataclass."""
    group = parser.add_argument_group("engine")
    hints = {}
    for cls in ENGINE_SECTIONS + (EngineConfig,):
        hints.update(typing.get_type_hints(cls))
    for cls in ENGINE_SECTIONS + (EngineConfig,):
        for f in dataclasses.fields(cls):
            if f.name == "model" or (cls is EngineConfig and f.name in SECTION_FIELDS):
                continue
            flags = ["--" + f.name.replace("_", "-"), *FLAG_ALIASES.get(f.name, ())]
            default = f.default if f.default is not dataclasses.MISSING else None
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default)
            else:
                base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
                group.add_argument(*flags, type=base, default=default, help=f"(default: {default})")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for cls in ENGINE_SECTIONS + (EngineConfig,) for f in dataclasses.fields(cls)}
    options = {k: v for k, v in vars(args).items() if k in names and k not in SECTION_FIELDS}
    return EngineConfig.from_flat(**options)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """One kebab-case flag per ServerConfig field, its default read from the dataclass (tuples: repeatable)."""
    group = parser.add_argument_group("server")
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(flag, action="append", type=typing.get_args(hint)[0], default=[], help="(repeatable)")
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(flag, type=base, default=f.default, help=f"(default: {f.default})")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: a self-hosted LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="one completion of a prompt, printed to stdout")
    complete.add_argument("prompt")
    complete.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder or hub id (default: embedded SmolLM2)")
    complete.add_argument("--max-tokens", type=int, default=64)
    complete.add_argument("--temperature", type=float, default=0.0)
    complete.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_engine_flags(complete)

    serve = sub.add_parser("serve", help="serve the model over HTTP (OpenAI, TGI and Ollama protocols)")
    serve.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder or hub id (default: embedded SmolLM2)")
    add_server_flags(serve)
    add_engine_flags(serve)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (/clear, /exit)")
    chat.add_argument("model", nargs="?", default=None, help="GGUF file, HF folder or hub id; with --url, the served model's name")
    chat.add_argument("--url", default=None, help="chat with a running server (e.g. http://127.0.0.1:8000) instead of loading the model")
    chat.add_argument("--api-key", default=None, help="with --url: the server's API key (sent as a bearer token)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    add_engine_flags(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"complete": run_complete, "serve": run_serve, "chat": run_chat}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        # Bad input (a wrong path, an unsupported architecture or device, a flag's value): the message, no traceback.
        print(f"ember: error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _no_gc_while_starting():
    """Start-up makes millions of objects that live as long as the process (torch's and FastAPI's modules, the
    vocabulary): cyclic-GC passes over them cost ~0.3 s of start-up and free nothing. So none while starting;
    then they are frozen, and later passes skip them."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _no_gc_while_starting():
        from ember.engine.async_engine import AsyncEngine
        from ember.server.app import run_server

        server_config = server_config_from_args(args)
        server_config.api_keys()  # a wrong --api-key-file is an error before the model loads
        engine = AsyncEngine.from_config(
            engine_config_from_args(args), max_queued_requests=server_config.max_queued_requests,
            max_stream_buffer=server_config.max_stream_buffer, grammar_compile_timeout=server_config.grammar_compile_timeout,
        )
    run_server(engine, server_config)
    return 0


def run_chat(args: argparse.Namespace, read=input, write=sys.stdout.write) -> int:
    """A terminal chat: each line is a user turn, answered as it streams; /clear forgets, /exit leaves."""
    if args.url:
        reply = _remote_replier(args)
    else:
        reply = _local_replier(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    write("Chatting; /clear starts over, /exit (or Ctrl-D) leaves.\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            history = []
            write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = ""
        try:
            for piece in reply(system + history):
                answer += piece
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stops this answer, keeps the session
            write(" [stopped]")
        except (urllib.error.URLError, RuntimeError) as exc:
            write(f"[error: {exc}]")
        write("\n")
        history.append({"role": "assistant", "content": answer})


def _local_replier(args: argparse.Namespace):
    from ember.llm import LLM

    engine = LLM(config=engine_config_from_args(args), progress=False).engine
    tokenizer = engine.tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def reply(messages: list[dict]):
        prompt, token_ids = tokenizer.encode_chat(messages)
        request_id = engine.add_request(prompt=prompt, params=params, prompt_token_ids=token_ids)
        try:
            while True:
                for output in engine.step():
                    if output.request_id == request_id:
                        yield output.outputs[0].text_delta
                        if output.finished:
                            return
        finally:
            engine.abort_request(request_id)

    return reply


def _remote_replier(args: argparse.Namespace):
    base = args.url.rstrip("/")
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    if model is None:
        try:
            response = urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=auth))
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{base}/v1/models: {json.load(exc).get('error', {}).get('message', exc)}") from None
        with response:
            model = json.load(response)["data"][0]["id"]

    def reply(messages: list[dict]):
        body = {
            "model": model, "messages": messages, "stream": True, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        }
        request = urllib.request.Request(
            base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **auth}
        )
        try:
            response = urllib.request.urlopen(request)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(json.load(exc).get("error", {}).get("message", str(exc))) from None
        with response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise RuntimeError(event["error"].get("message"))
                for choice in event.get("choices", []):
                    yield choice["delta"].get("content") or ""

    return reply


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
