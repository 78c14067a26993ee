"""Mixed precision: the few computations a method needs in fp32 even when the forward runs under autocast
(`Trainer(bf16=True)`, `accelerate --mixed_precision bf16`)."""

from __future__ import annotations

import torch


def full_precision(device: torch.device | str) -> torch.autocast:
    """Autocast switched off on `device`'s type, so matmuls and convolutions inside run in their inputs'
    dtype (give them fp32 inputs); outside autocast it changes nothing."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, enabled=False)
