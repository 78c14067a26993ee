"""Two queues (image, text) of past teacher embeddings, D×K, sharing one write pointer.

Slots are written in order from 0, so the filled part is always the first `filled` columns; only
those take part in the loss (an empty queue adds no keys, rather than random vectors).
"""

from __future__ import annotations

import torch


class KeyQueues:
    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.image = torch.empty(0)   # [D, K] once the embedding width is known
        self.text = torch.empty(0)
        self.ptr = torch.zeros((), dtype=torch.long)
        self.filled = torch.zeros((), dtype=torch.long)

    @property
    def allocated(self) -> bool:
        return self.image.dim() == 2

    def allocate(self, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        """Empty queues of width `dim`. Done at wrap time when the width is known, so that a fresh wrapper's
        state has the shapes of a saved one (DCP and FSDP checkpoints load in place)."""
        self.image = torch.zeros(dim, self.size, dtype=dtype, device=device)
        self.text = torch.zeros(dim, self.size, dtype=dtype, device=device)

    def keys(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The filled columns `[D, filled]` of each queue (None while empty)."""
        n = int(self.filled)
        if self.size == 0 or n == 0:
            return None, None
        return self.image[:, :n], self.text[:, :n]

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Write `[n, D]` keys at the pointer, wrapping around; with n > K only the last K are kept."""
        if self.size == 0:
            return
        if not self.allocated:  # fp32 at least: keys of a bf16 model are not rounded again in the queue
            self.allocate(image_keys.shape[1], torch.promote_types(image_keys.dtype, torch.float32),
                          image_keys.device)
        if self.image.device != image_keys.device:
            self.image, self.text = self.image.to(image_keys.device), self.text.to(image_keys.device)
        n = image_keys.shape[0]
        if n > self.size:
            image_keys, text_keys, n = image_keys[-self.size:], text_keys[-self.size:], self.size
        start = int(self.ptr)
        slots = (torch.arange(n, device=self.image.device) + start) % self.size
        self.image[:, slots] = image_keys.T.to(self.image.dtype)
        self.text[:, slots] = text_keys.T.to(self.text.dtype)
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def state(self) -> dict[str, torch.Tensor]:
        return {"image_queue": self.image, "text_queue": self.text, "queue_ptr": self.ptr,
                "queue_filled": self.filled}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        image, text = state["image_queue"], state["text_queue"]
        if image.dim() == 2 and image.shape[1] != self.size:
            raise ValueError(f"saved queues hold {image.shape[1]} keys but queue_size is {self.size}")
        device = self.image.device if self.allocated else image.device
        self.image = image.detach().clone().to(device)
        self.text = text.detach().clone().to(device)
        self.ptr = state["queue_ptr"].detach().clone().to(torch.long).cpu()
        self.filled = state["queue_filled"].detach().clone().to(torch.long).cpu()
