import numpy as np
import pytest
import torch

from moxin_lightning.datamodules.packing import IGNORE_INDEX, TokenPacker


def documents(lengths, start=10):
    docs, next_token = [], start
    for n in lengths:
        docs.append(np.arange(next_token, next_token + n))
        next_token += n
    return docs


def test_rows_overlap_by_one_token_so_inputs_are_the_stream():
    docs = documents([5, 9, 3, 20, 7])
    stream = np.concatenate(docs)
    packer = TokenPacker()
    packer.add_documents(docs)
    first = packer.emit(2, 8)
    second = packer.emit(1, 12)
    inputs = torch.cat([first["input_ids"].flatten(), second["input_ids"].flatten()])
    assert inputs.tolist() == stream[:28].tolist()
    labels_unmasked = torch.cat([first["labels"].flatten(), second["labels"].flatten()])
    expected = stream[1:29].copy()
    doc_starts = np.cumsum([0, *[len(d) for d in docs]])[1:-1]  # stream index where docs 2.. begin
    expected[[s - 1 for s in doc_starts if s - 1 < 28]] = IGNORE_INDEX
    assert labels_unmasked.tolist() == expected.tolist()
    assert packer.tokens_emitted == 28 and packer.buffered == len(stream) - 28


def test_doc_ids_restart_per_row_and_follow_document_starts():
    packer = TokenPacker()
    packer.add_documents(documents([3, 4, 10]))
    batch = packer.emit(2, 6)
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert batch["labels"][0, 2].item() == IGNORE_INDEX  # last token of doc 0 would predict doc 1's first
    assert batch["labels"][1, 0].item() == IGNORE_INDEX


def test_switching_seq_len_skips_and_repeats_nothing():
    docs = documents([50, 13, 70, 31, 90])
    stream = np.concatenate(docs)
    packer = TokenPacker()
    packer.add_documents(docs)
    seen = []
    for seq_len in (8, 8, 16, 4, 32, 32):
        seen.append(packer.emit(2, seq_len)["input_ids"].flatten())
    seen = torch.cat(seen)
    assert seen.tolist() == stream[: len(seen)].tolist()


def test_state_round_trip_continues_identically():
    packer = TokenPacker()
    packer.add_documents(documents([40, 40, 40]))
    packer.emit(1, 16)
    restored = TokenPacker()
    restored.load_state_dict(packer.state_dict())
    for a, b in zip(packer.emit(3, 16).values(), restored.emit(3, 16).values(), strict=True):
        assert torch.equal(a, b)
    assert restored.tokens_emitted == packer.tokens_emitted == 64


def test_asking_for_more_than_is_buffered_is_an_error():
    packer = TokenPacker()
    packer.add_documents(documents([10]))
    with pytest.raises(RuntimeError, match="packer holds 10 tokens, 17 needed"):
        packer.emit(2, 8)
