import torch

from contract_cases import ContractCase
from tiny_models import tiny_llama, token_batch


def _examples(n, seed):
    batch = token_batch(n, seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def case() -> ContractCase:
    return ContractCase(
        make_student=lambda: tiny_llama(seed=1, tie=True),
        make_teacher=lambda student: tiny_llama(layers=3, hidden=48, seed=2),
        config={"alpha": 0.5, "temperature": 2.0,
                "features": [{"student": "model.layers.1", "teacher": "model.layers.2"}]},
        examples=_examples,
        collate=_collate,
        num_items=lambda batches: sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
    )
