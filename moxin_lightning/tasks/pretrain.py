"""`Pretrain`: next-token prediction on packed documents (Moxin's three pretraining phases)."""

from __future__ import annotations

import torch

from moxin_lightning.tasks.base import TrainingTask


class Pretrain(TrainingTask):
    """Causal LM loss on `PretrainData` batches {input_ids, labels, doc_ids}.

    Attention and RoPE positions restart at every document start (`doc_ids`), and the label of a document's
    first token is masked in the data, so no loss is taken across a document boundary. Validation reports
    the token-weighted loss and perplexity (exp of that loss) of the held-out split."""

    reports_perplexity = True

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["labels"])
