"""`python -m moxin_lightning demo`: exercise the backbone end to end on a tiny Moxin-shaped model.

It builds the preset with random weights (no hub is reachable, so nothing is downloaded), generates
past the sliding window with the rolling-buffer cache, re-scores the whole sequence in one forward
to check the cached tokens and log-probs, then exports a Hugging Face folder and, when transformers
is installed, checks that `MistralForCausalLM` gives the same logits. Exit status 0 means every check held.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from moxin_lightning.generate import sample
from moxin_lightning.hf import export_hf, import_hf
from moxin_lightning.model import ModelConfig, RollingKVCache, Transformer
from moxin_lightning.model.transformer import same_weights


def run_demo(preset: str = "moxin-tiny-9m", new_tokens: int = 600, out_dir: str | None = None) -> int:
    torch.manual_seed(0)
    config = ModelConfig.from_name(preset)
    model = Transformer(config).eval()
    print(f"{preset}: {model.num_params():,} parameters, window {config.sliding_window}, random weights")
    failures = 0

    prompts = [[config.bos_id, *torch.randint(3, config.vocab_size, (n,)).tolist()] for n in (40, 300)]
    start = time.perf_counter()
    result = sample(model, prompts, new_tokens)
    seconds = time.perf_counter() - start
    produced = sum(len(t) for t in result.tokens)
    cache = RollingKVCache(config, 1, max_len=len(prompts[1]) + new_tokens)
    print(
        f"generated {produced} tokens for 2 ragged prompts in {seconds:.2f} s ({produced / seconds:.0f} tokens/s); "
        f"cache {cache.nbytes:,} bytes per sequence ({cache.slots} slots for {len(prompts[1]) + new_tokens} tokens)"
    )
    for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs, strict=True):
        with torch.no_grad():
            scores = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), -1)[len(prompt) - 1 : -1]
        same_tokens = scores.argmax(-1).tolist() == tokens
        gap = (scores.gather(1, torch.tensor(tokens)[:, None]).squeeze(1) - torch.tensor(logprobs)).abs().max().item()
        ok = same_tokens and gap < 1e-4
        failures += not ok
        print(f"  rescore of {len(prompt)}+{len(tokens)} tokens: argmax equal={same_tokens}, max |dlogp|={gap:.1e}")

    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp()) / "moxin-demo-hf"
    export_hf(model, folder, overwrite=out_dir is not None)
    again = import_hf(folder)
    identical = same_weights(model, again)
    failures += not identical
    print(f"exported {folder}: re-import bit-identical={identical}")
    failures += _check_transformers(model, folder)
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def _check_transformers(model: Transformer, folder: Path) -> int:
    try:
        from transformers import MistralForCausalLM
    except ImportError:
        print("transformers not installed: skipped the MistralForCausalLM comparison")
        return 0
    reference = MistralForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * model.config.sliding_window + 7))
    with torch.no_grad():
        gap = (reference(ids).logits - model(ids)).abs().max().item()
    print(f"transformers MistralForCausalLM on {ids.shape[1]} tokens: max |dlogit|={gap:.1e}")
    return int(gap > 1e-4)
