"""A map-style dataset over a list of ready-made examples, for tests that run the real HF Trainer."""

import torch


class ExampleList(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
