"""The `generate` command: talk to a checkpoint from the terminal, tokens shown as they are sampled.

    python -m moxin_lightning generate --checkpoint runs/local/release --prompt "def fibonacci("
    python -m moxin_lightning generate --checkpoint runs/sft-local/release --chat

With `--prompt` the model continues the text (BOS + prompt, no template). With `--chat` it is a conversation
in the chat template the instruct stages train with (Tülu's by default): type a message, the reply streams
back; `/reset` starts over, `/exit` or end-of-input (Ctrl-D) quits. The conversation's KV cache is kept
between turns (`session.DecodeSession`), so a turn costs only its new tokens. A summary line (tokens,
tokens/s) goes to stderr, so stdout holds only the text.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch

from moxin_lightning.checkpoint import LoadedModel, check_device, load_model
from moxin_lightning.release.write import DTYPES
from moxin_lightning.session import DecodeSession, TextStream
from moxin_lightning.tokenizers.chat import ASSISTANT, SYSTEM, USER, ChatTemplate, TuluTemplate

TEMPLATES: dict[str, Callable[[], ChatTemplate]] = {"tulu": TuluTemplate}


def complete(
    loaded: LoadedModel,
    prompt: str,
    session: DecodeSession,
    settings: argparse.Namespace,
    out: TextIO,
    generator: torch.Generator | None,
) -> list[int]:
    """Stream the continuation of `prompt` to `out`; returns the sampled ids."""
    ids = loaded.tokenizer.encode(prompt, bos=True)
    session.reset()
    session.feed(ids)
    return _stream_reply(loaded, session, ids, settings, out, generator)


def chat(
    loaded: LoadedModel,
    template: ChatTemplate,
    session: DecodeSession,
    settings: argparse.Namespace,
    read: Callable[[], str | None],
    out: TextIO,
    generator: torch.Generator | None,
) -> list[dict[str, str]]:
    """Run the conversation loop until `read` returns None or `/exit`; returns the conversation."""
    base = [{"role": SYSTEM, "content": settings.system}] if settings.system else []
    messages = list(base)
    while (line := read()) is not None:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(base)
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": USER, "content": text})
        ids, _ = template.encode(loaded.tokenizer, messages, add_generation_prompt=True)
        try:
            session.continue_with(ids)
        except ValueError as error:  # the conversation outgrew the model: say so and keep the session usable
            messages.pop()
            print(f"({error}; /reset to start over)", file=out, flush=True)
            continue
        reply = _stream_reply(loaded, session, ids, settings, out, generator)
        if reply and reply[-1] == loaded.tokenizer.eos_id:
            reply = reply[:-1]
        messages.append({"role": ASSISTANT, "content": loaded.tokenizer.decode(reply)})
    return messages


def _stream_reply(
    loaded: LoadedModel,
    session: DecodeSession,
    context: list[int],
    settings: argparse.Namespace,
    out: TextIO,
    generator: torch.Generator | None,
) -> list[int]:
    text = TextStream(loaded.tokenizer, context)
    sampled: list[int] = []
    started = time.perf_counter()
    for token in session.stream(
        settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        eos_id=loaded.tokenizer.eos_id,
        generator=generator,
    ):
        sampled.append(token)
        piece = text.add(token)
        if piece:
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - started
    rate = len(sampled) / max(seconds, 1e-9)
    print(f"[{len(sampled)} tokens in {seconds:.2f} s, {rate:.1f} tokens/s]", file=sys.stderr)
    return sampled


def _read_line(prompt: str) -> Callable[[], str | None]:
    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    return read


def _run(args: argparse.Namespace) -> None:
    if args.chat == (args.prompt is not None):  # neither, or both
        raise ValueError("give either --prompt TEXT or --chat")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # `nan >= 0` is False, so NaN stops here
        raise ValueError(f"--temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError(f"need 0 < --top_p <= 1 and --top_k >= 0; got {args.top_p}, {args.top_k}")
    check_device(args.device)  # before the weights are read
    loaded = load_model(args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=DTYPES[args.dtype])
    session = DecodeSession(loaded.model, vocab_limit=loaded.tokenizer.vocab_size, compile=args.compile)
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    if args.chat:
        chat(loaded, TEMPLATES[args.template](), session, args, _read_line("> "), sys.stdout, generator)
    else:
        complete(loaded, args.prompt, session, args, sys.stdout, generator)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "generate",
        help="stream a continuation of --prompt, or chat (--chat), from a checkpoint",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a release / Hugging Face folder, a .ckpt file or a sharded checkpoint"
    )
    parser.add_argument("--prompt", default=None, help="text to continue (BOS + prompt, no chat template)")
    parser.add_argument("--chat", action="store_true", help="interactive conversation in the chat template")
    parser.add_argument("--template", default="tulu", choices=sorted(TEMPLATES), help="chat template (--chat)")
    parser.add_argument("--system", default=None, help="system message that opens the conversation (--chat)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for a checkpoint that holds none")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off for long runs)")
    parser.set_defaults(run=_run)
