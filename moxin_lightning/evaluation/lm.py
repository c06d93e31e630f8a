"""`MoxinLM`: lm-evaluation-harness's model interface on our backbone, registered as model "moxin".

The harness sends three kinds of request; each is answered the way lm-eval's own Hugging Face backend
(`HFLM`) answers it for a Llama / Mistral SentencePiece tokenizer, so scores match between the backends
(tested to 1e-4 on an exported folder) and stay comparable with numbers published from `lm_eval --model hf`:

* BOS: every text the harness encodes starts with BOS (what HF's Llama tokenizer does by default); a
  text that already starts with the BOS piece (`<s>`) gets that id instead of a second one, and the rest
  is encoded as text after BOS always is (transformers 5 would drop the rest's leading "▁" there). An
  empty context is replaced by BOS alone (the harness's `prefix_token_id`).
* `loglikelihood`: context and continuation are encoded together and split after the context's tokens
  (lm-eval's `TemplateLM._encode_pair`: trailing spaces of the context move to the continuation). Requests
  run longest first in batches, right-padded; a context longer than `max_length` is cut from the left.
* `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens over BOS + text,
  with BOS as the prefix token. As in HFLM, the text's own BOS is therefore the first token scored
  (log p(BOS | BOS) is part of the total): the harness's convention, kept so perplexities agree.
* `generate_until`: our rolling-cache generator (`moxin_lightning.generate`), greedy unless the task
  asks for `do_sample` with a temperature; a row stops at EOS or, checked every 32 tokens, once a stop
  string has appeared; the text is cut at the first stop string. A task with no stop strings (the reasoning
  set: long answers ended by EOS) generates in one call.
  The context is cut from the left to leave room for `max_gen_toks` new tokens.

On a live model (in-loop evaluation, `moxin_lightning.callbacks.InLoopEvaluation`): `freeze=False` leaves the
model's mode and `requires_grad` alone, and `split_across_ranks=True` shares the work between the processes of
the initialised `torch.distributed` group. Every process builds every request (lm-eval sees one process, so
few-shot contexts and metrics are those of a one-process run); the batches, formed exactly as one process
forms them, go to the ranks in turn (batch i to rank i mod world size), and the answers are exchanged, so each
process returns all of them, batch for batch what one process computes.

Text goes through our tokenizer (SentencePiece as in training). HF's conversion of a bare
`tokenizer.model` in transformers 5 differs on one point: a text that *starts* with a space loses one
leading "▁" there. The harness only encodes such texts for an empty context or a document that begins
with whitespace; the shipped local tasks have neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from moxin_lightning.generate import generate
from moxin_lightning.model.transformer import Transformer
from moxin_lightning.tokenizers import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default when a task names none
STOP_CHECK_TOKENS = 32  # new tokens between checks for stop strings


@register_model("moxin")
class MoxinLM(TemplateLM):
    """Scores and generates with a `Transformer` and the tokenizer it was trained with.

    Build it from a loaded model (`MoxinLM(model, tokenizer)`), from a checkpoint
    (`MoxinLM(checkpoint="runs/phase1/release")`, any path `moxin_lightning.checkpoint.load_model` opens), or
    from the harness: `simple_evaluate(model="moxin", model_args="checkpoint=PATH,batch_size=8")`.

    Args:
        batch_size: requests per forward pass (log-likelihoods) or per generation batch.
        max_length: longest token window (default: the model's `max_seq_len`).
        max_gen_toks: new tokens when a generation task does not say.
        device, dtype: where and in which precision to run (default: where the given model lives / as stored).
        seed: seed of sampled generations (greedy ones do not use it).
        add_bos_token: start every encoded text with BOS (default True, as HF's Llama tokenizer).
        freeze: put the model in eval mode without gradients (default); False for a model that is being trained
            (its owner switches modes around the evaluation).
        split_across_ranks: under an initialised torch.distributed group, compute every world-size-th batch
            here and exchange the answers (see the module docstring); every process must make the same calls.
        show_progress: tqdm bars per request type.
    """

    backend = "causal"

    def __init__(
        self,
        model: Transformer | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        *,
        checkpoint: str | Path | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        add_bos_token: bool = True,
        freeze: bool = True,
        split_across_ranks: bool = False,
        show_progress: bool = True,
        max_batch_size: int | None = None,  # noqa: ARG002 - passed by simple_evaluate; batches are fixed here
    ) -> None:
        super().__init__()
        torch_dtype = _as_dtype(dtype)
        self._batch_size = _as_batch_size(batch_size)  # bad options are refused before a checkpoint loads
        self.source: Path | None = None
        if (model is None) == (checkpoint is None):
            raise ValueError("give MoxinLM either a model (with its tokenizer) or checkpoint=PATH")
        if checkpoint is not None:
            from moxin_lightning.checkpoint import load_model

            loaded = load_model(checkpoint, tokenizer=tokenizer, device=device or "cpu", dtype=torch_dtype)
            model, tokenizer, self.source = loaded.model, loaded.tokenizer, loaded.source
        elif tokenizer is None or isinstance(tokenizer, (str, Path)):
            raise ValueError("MoxinLM(model, tokenizer) needs the tokenizer object the model was trained with")
        elif device is not None or torch_dtype is not None:
            model = model.to(device=device, dtype=torch_dtype)
        self.model = model.eval().requires_grad_(False) if freeze else model
        self.tokenizer = tokenizer
        self._max_length = int(max_length) if max_length else model.config.max_seq_len
        if not 1 <= self._max_length <= model.config.max_seq_len:
            raise ValueError(f"max_length={max_length} must be between 1 and the model's {model.config.max_seq_len}")
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.add_bos_token = bool(add_bos_token)
        self._bos_piece = _bos_piece(tokenizer)
        self.split_across_ranks = bool(split_across_ranks)
        self.show_progress = bool(show_progress)

    # -- what the harness asks of every LM --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return f"moxin-{self.tokenizer.fingerprint[:16]}"

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results JSON's `config`."""
        return {
            "model_source": str(self.source) if self.source else None,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "max_length": self.max_length,
        }

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """BOS + SentencePiece ids (see the module docstring); `add_special_tokens=False` leaves BOS out."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._bos_piece and string.startswith(self._bos_piece):
            string, bos = string[len(self._bos_piece) :], True
        ids = self.tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- log-likelihoods ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        for _, _, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored in a {self.max_length}-token "
                    "window; raise max_length or shorten the task's answers"
                )
        order = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))

        def score(chunk: list, _: int) -> list[tuple[float, bool]]:
            return self._score_batch([(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk], chunk)

        results: list[tuple[float, bool]] = []
        batches = list(order.get_batched(n=self.batch_size))
        scores = self._run_batches(batches, score, disable_tqdm, "loglikelihood")
        for chunk, answers in zip(batches, scores, strict=True):
            for (request, _, _), answer in zip(chunk, answers, strict=True):
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                results.append(answer)
        return order.get_original(results)

    def _run_batches(self, batches: list[list], compute, disable_tqdm: bool, kind: str) -> list[list]:
        """`compute(batch, index)` for every batch, in order: all here, or (split_across_ranks under an initialised
        process group) every world-size-th one here and the rest from the other ranks."""
        rank, world = _rank_and_world() if self.split_across_ranks else (0, 1)
        mine = range(rank, len(batches), world)
        progress = tqdm(
            total=sum(len(batches[i]) for i in mine), disable=disable_tqdm or not self.show_progress,
            desc=f"Running {kind} requests" + (f" (rank {rank} of {world})" if world > 1 else ""),
        )  # fmt: skip
        answers: dict[int, list] = {}
        for index in mine:
            answers[index] = compute(batches[index], index)
            progress.update(len(batches[index]))
        progress.close()
        if world > 1:
            gathered: list[dict[int, list] | None] = [None] * world
            torch.distributed.all_gather_object(gathered, answers)
            for part in gathered:
                answers.update(part)
        return [answers[index] for index in range(len(batches))]

    @torch.no_grad()  # not inference_mode: a live model's lazily built buffers must stay usable by training
    def _score_batch(self, inputs: list[list[int]], chunk: list) -> list[tuple[float, bool]]:
        """One right-padded forward pass; the head runs once, on just the positions that predict continuations."""
        ids = torch.zeros(len(inputs), max(len(row) for row in inputs), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        hidden = self.model.hidden_states(ids.to(self.device))
        continuations = [continuation for _, _, continuation in chunk]
        rows = torch.cat([torch.full((len(c),), row) for row, c in enumerate(continuations)])
        columns = torch.cat([torch.arange(len(t) - len(c), len(t)) for t, c in zip(inputs, continuations, strict=True)])
        logprobs = self.model.head(hidden[rows.to(self.device), columns.to(self.device)]).float().log_softmax(-1)
        targets = torch.tensor([t for c in continuations for t in c], device=logprobs.device)
        scores = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).double()  # float64 sums: long texts
        hits = logprobs.argmax(dim=-1) == targets
        sizes = [len(c) for c in continuations]
        return [
            (float(score.sum()), bool(hit.all()))
            for score, hit in zip(scores.split(sizes), hits.split(sizes), strict=True)
        ]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text over disjoint windows of `max_length` tokens (lm-eval's rolling)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pieces = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores, strict=True):
            totals[owner] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string; requests with equal gen_kwargs share batches."""
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )

        def generate_batch(chunk: list, batch_number: int) -> list[str]:
            contexts, all_kwargs = zip(*chunk, strict=True)
            return self._generate_batch(list(contexts), all_kwargs[0], seed=self.seed + batch_number)

        results: list[str] = []
        batches = list(order.get_batched(n=self.batch_size))
        generations = self._run_batches(batches, generate_batch, disable_tqdm, "generate_until")
        for chunk, texts in zip(batches, generations, strict=True):
            for (context, gen_kwargs), text in zip(chunk, texts, strict=True):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
        return order.get_original(results)

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict[str, Any], seed: int) -> list[str]:
        """Generate in segments of `STOP_CHECK_TOKENS`; a row leaves the batch once it shows a stop string or EOS.

        Tasks often allow hundreds of tokens and stop after a few dozen: checking between segments saves the
        rest. A continuing row is re-prefilled with its prompt plus what it produced (the rolling cache cannot
        be resumed across `generate` calls); greedy decoding gives the tokens one long call would."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        stops, max_new = [stop for stop in kwargs["until"] if stop], kwargs["max_gen_toks"]
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in a {self.max_length}-token window")
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        options = dict(
            temperature=float(kwargs["temperature"]) if sampled else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sampled else 1.0,
            top_k=int(kwargs.get("top_k") or 0) if sampled else 0,
            eos_id=self.eot_token_id,
            vocab_limit=self.tokenizer.vocab_size,  # a padded vocabulary's extra ids have no text
        )
        prompts = [self.tok_encode(context, left_truncate_len=room) for context in contexts]
        produced: list[list[int]] = [[] for _ in prompts]
        active, done_tokens = list(range(len(prompts))), 0
        while active and done_tokens < max_new:
            count = min(STOP_CHECK_TOKENS, max_new - done_tokens) if stops else max_new  # nothing to check but EOS
            rows = [prompts[i] + produced[i] for i in active]
            segment = generate(self.model, rows, count, seed=seed + done_tokens if sampled else None, **options)
            for i, tokens in zip(active, segment, strict=True):
                produced[i] += tokens
            done_tokens += count
            active = [i for i in active if not self._finished(produced[i], stops)]
        texts = []
        for tokens in produced:
            if tokens and tokens[-1] == self.eot_token_id:
                tokens = tokens[:-1]
            texts.append(postprocess_generated_text(self.tok_decode(tokens), stops, think_end_token=None))
        return texts

    def _finished(self, tokens: list[int], stops: list[str]) -> bool:
        if tokens and tokens[-1] == self.eot_token_id:
            return True
        text = self.tok_decode(tokens)
        return any(stop in text for stop in stops)


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from moxin_lightning.release.write import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _as_batch_size(batch_size: int | str) -> int:
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (automatic sizing is not supported)")
    return batch_size


def _bos_piece(tokenizer: Tokenizer) -> str | None:
    """The BOS token's text (`<s>`) when the tokenizer can name it, for texts that spell it out."""
    processor = getattr(tokenizer, "processor", None)
    return processor.id_to_piece(tokenizer.bos_id) if processor is not None else None
