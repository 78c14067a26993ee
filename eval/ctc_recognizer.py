"""Downstream use of a pretrained text-image encoder (a CCD teacher): a small CTC recogniser to fine-tune, save and
evaluate (`vlmdistill eval str`)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.data.text_lmdb import CHARSET_36
from vlmdistill.plugins.ccd.backbones import describe_backbone, patch_tokens
from vlmdistill.plugins.ccd.vit import CCDViT

ENCODER_DIR = "encoder"
HEAD_NAME = "ctc_head.safetensors"
RECOGNIZER_CONFIG = "recognizer.json"


class CTCRecognizer(nn.Module):
    """ViT encoder -> average over token rows -> LayerNorm + linear -> CTC over the token columns.

    Works with encoders whose output has `last_hidden_state` (the CCD ViT, transformers ViT/DeiT). With 4-pixel
    patches a 128-pixel-wide image gives 32 time steps.
    """

    def __init__(self, encoder: nn.Module, charset: str = CHARSET_36) -> None:
        super().__init__()
        self.encoder = encoder
        self.charset = charset
        spec = describe_backbone(encoder)
        self.patch_size = spec.patch_size
        self.norm = nn.LayerNorm(spec.width)
        self.classifier = nn.Linear(spec.width, len(charset) + 1)  # index 0 = CTC blank

    def column_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, T, E]`: encoder patch tokens averaged over each column of the token grid."""
        h, w = pixel_values.shape[-2:]
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        tokens = patch_tokens(self.encoder(pixel_values=pixel_values).last_hidden_state, grid)
        return tokens.view(tokens.shape[0], grid[0], grid[1], -1).mean(1)

    def classify(self, columns: torch.Tensor) -> torch.Tensor:
        """Column features -> `[B, T, classes]` log-probabilities."""
        return F.log_softmax(self.classifier(self.norm(columns)).float(), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, T, classes]` log-probabilities, T = image width / patch width."""
        return self.classify(self.column_features(pixel_values))

    def encode(self, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        index = {c: i + 1 for i, c in enumerate(self.charset)}
        unknown = {c for word in words for c in word if c not in index}
        if unknown:
            raise ValueError(f"characters {sorted(unknown)} are not in the recogniser's charset")
        targets = torch.tensor([index[c] for word in words for c in word], dtype=torch.long)
        return targets, torch.tensor([len(word) for word in words], dtype=torch.long)

    def ctc_loss(self, log_probs: torch.Tensor, words: list[str]) -> torch.Tensor:
        targets, lengths = self.encode(words)
        steps = torch.full((log_probs.shape[0],), log_probs.shape[1], dtype=torch.long)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, steps, lengths, blank=0, zero_infinity=True)

    def loss(self, pixel_values: torch.Tensor, words: list[str]) -> torch.Tensor:
        return self.ctc_loss(self(pixel_values), words)

    def greedy_decode(self, log_probs: torch.Tensor) -> list[str]:
        """Best class per step, repeats merged, blanks dropped."""
        words = []
        for row in log_probs.argmax(-1).tolist():
            chars, previous = [], 0
            for k in row:
                if k != previous and k != 0:
                    chars.append(self.charset[k - 1])
                previous = k
            words.append("".join(chars))
        return words

    @torch.no_grad()
    def decode(self, pixel_values: torch.Tensor) -> list[str]:
        return self.greedy_decode(self(pixel_values))

    # ------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str) -> None:
        """`encoder/` in the encoder's native format, the head in `ctc_head.safetensors`, and `recognizer.json`
        (charset, encoder kind): what `vlmdistill eval str --model DIR` loads."""
        from vlmdistill.io import save_student, save_tensors

        os.makedirs(directory, exist_ok=True)
        save_student(self.encoder, os.path.join(directory, ENCODER_DIR))
        head = {f"norm.{k}": v for k, v in self.norm.state_dict().items()}
        head.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        save_tensors(head, os.path.join(directory, HEAD_NAME))
        kind = "ccd_vit" if isinstance(self.encoder, CCDViT) else "transformers"
        with open(os.path.join(directory, RECOGNIZER_CONFIG), "w") as fh:
            json.dump({"charset": self.charset, "encoder": kind}, fh, indent=2)
            fh.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str) -> "CTCRecognizer":
        from vlmdistill.errors import DataError
        from vlmdistill.io import load_tensors

        config_path = os.path.join(directory, RECOGNIZER_CONFIG)
        if not os.path.isfile(config_path):
            raise DataError(f"{directory}: no {RECOGNIZER_CONFIG}; not a recogniser saved by "
                            "CTCRecognizer.save_pretrained")
        with open(config_path) as fh:
            meta = json.load(fh)
        encoder_dir = os.path.join(directory, ENCODER_DIR)
        if meta.get("encoder") == "ccd_vit":
            encoder = CCDViT.from_pretrained(encoder_dir)
        else:
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(encoder_dir, local_files_only=True)
        recogniser = cls(encoder, meta["charset"])
        head = load_tensors(os.path.join(directory, HEAD_NAME))
        recogniser.norm.load_state_dict({k[5:]: v for k, v in head.items() if k.startswith("norm.")})
        recogniser.classifier.load_state_dict({k[11:]: v for k, v in head.items() if k.startswith("classifier.")})
        return recogniser.eval()
