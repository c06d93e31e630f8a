"""A release opens in Hugging Face transformers the way its model card says: `AutoTokenizer` and
`AutoModelForCausalLM` on the folder, then `generate`. With Moxin's 32K vocabulary (Mistral-7B's
`tokenizer.model`, read from the `mistral_common` wheel, which transformers itself imports when installed)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moxin_lightning.generate import generate
from moxin_lightning.hf import export_hf
from moxin_lightning.tokenizers import SentencePieceTokenizer

from .conftest import tiny_model

MOXIN_TOKENIZER = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
TEXTS = ["def main():", "The Moxin model is fully open.", "数学 and naïve café"]


def test_a_release_loads_with_auto_classes_and_generates_what_our_model_generates(tmp_path):
    model = tiny_model(seed=3, vocab_size=32000)
    export_hf(model, tmp_path / "release", tokenizer=MOXIN_TOKENIZER)
    ours = SentencePieceTokenizer(MOXIN_TOKENIZER)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "release")
    assert len(tokenizer) == ours.vocab_size == 32000
    for text in TEXTS:
        ids = [ours.bos_id, *ours.encode(text)]
        assert tokenizer(text).input_ids == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "release").eval()
    prompt = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        generated = hf_model.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=ours.eos_id)
    (expected,) = generate(model, [prompt.input_ids[0].tolist()], max_new_tokens=10)
    assert generated[0, prompt.input_ids.shape[1] :].tolist() == expected
