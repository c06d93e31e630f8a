"""Command-line entry point: `python -m moxin_lightning <command>`.

Training runs through Lightning: `fit`, `validate` and `test` are a `LightningCLI` (`MoxinCLI`) reading YAML
(`--config` files merge in order, `${...}` interpolations resolve after merging, any key can be set with a
flag such as `--trainer.max_steps=100`, `--print_config` shows the result). The other commands are plain
argparse: `info` (a preset's size, FLOPs and cache memory), `demo` (a self-check of the backbone, the
rolling-buffer generator and the Hugging Face round trip on a tiny model), `train-tokenizer`, `prepare` and `verify`
(the data pipeline), `sweep` (a W&B sweep spec run locally with Optuna), `generate` (stream a continuation or
chat), `export` (a checkpoint as a Hugging Face folder) and `eval` (lm-evaluation-harness). Each command module
registers its own arguments and raises one-line errors, which `main` prints as `error: ...` (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from moxin_lightning.errors import USER_ERRORS, exit_with
from moxin_lightning.model.config import PRESETS, ModelConfig

LIGHTNING_COMMANDS = {
    "fit": "train a task from YAML configs, e.g. fit --config conf/phase1.yaml --config conf/local.yaml",
    "validate": "run the validation loop of a config on a checkpoint (--ckpt_path)",
    "test": "run the test loop of a config on a checkpoint (--ckpt_path)",
}


def _info(args: argparse.Namespace) -> None:
    import torch

    from moxin_lightning.model.cache import RollingKVCache

    config = ModelConfig.from_name(args.preset)
    cache = RollingKVCache(config, 1, dtype=torch.bfloat16, device="meta")
    full = RollingKVCache(config.replace(sliding_window=None), 1, dtype=torch.bfloat16, device="meta")
    print(f"preset            {args.preset}")
    for name, value in config.to_dict().items():
        print(f"  {name:<16}{value}")
    print(f"parameters        {config.num_params():,}")
    print(f"train FLOPs/token {config.flops_per_token(args.seq_len):,} at sequence {args.seq_len}")
    print(
        f"KV cache (bf16)   {cache.nbytes:,} bytes per sequence with the rolling buffer "
        f"({cache.slots} slots); {full.nbytes:,} for a full {config.max_seq_len}-token cache"
    )


def _demo(args: argparse.Namespace) -> None:
    from moxin_lightning.demo import run_demo

    sys.exit(run_demo(preset=args.preset, new_tokens=args.new_tokens, out_dir=args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moxin_lightning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in LIGHTNING_COMMANDS.items():  # listed for --help; main() hands them to LightningCLI
        commands.add_parser(name, help=f"{what} (LightningCLI: `{name} --help` for its options)", add_help=False)

    info = commands.add_parser("info", help="size, FLOPs per token and KV-cache memory of a model preset")
    info.add_argument("--preset", default="moxin-7b", choices=sorted(PRESETS))
    info.add_argument("--seq_len", type=int, default=2048, help="sequence length for the FLOPs figure")
    info.set_defaults(run=_info)

    demo = commands.add_parser("demo", help="self-check: generate past the window, verify, round-trip through HF")
    demo.add_argument("--preset", default="moxin-tiny-9m", choices=sorted(PRESETS))
    demo.add_argument("--new_tokens", type=int, default=600)
    demo.add_argument("--out", default=None, help="where to write the exported HF folder (default: a temp dir)")
    demo.set_defaults(run=_demo)

    from moxin_lightning.tokenizers.train import register as register_train_tokenizer

    register_train_tokenizer(commands)
    from moxin_lightning.data.prepare import register as register_prepare

    register_prepare(commands)
    from moxin_lightning.data.integrity import register as register_verify

    register_verify(commands)
    from moxin_lightning.sweep import register as register_sweep

    register_sweep(commands)
    from moxin_lightning.terminal import register as register_generate

    register_generate(commands)
    from moxin_lightning.export import register as register_export

    register_export(commands)
    from moxin_lightning.evaluation.command import register as register_eval

    register_eval(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in LIGHTNING_COMMANDS:
        from moxin_lightning.lightning_cli import run_lightning

        run_lightning(None if argv is None else words)  # None: LightningCLI reads sys.argv itself
        return
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        exit_with(error)
    except KeyboardInterrupt:
        sys.exit(130)
