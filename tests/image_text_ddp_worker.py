"""Which samples each process trains on, under the HF Trainer with 2 CPU processes (accelerate, gloo).

Launched by tests/test_image_text_ddp.py as `accelerate launch --multi_gpu --num_processes 2 THIS DATA OUT`.
DATA holds an image folder (`folder/`), the same samples as webdataset shards (`shards/`) and a student
checkpoint with its tokenizer and processor (`student/`). For each loading path the worker trains dcclip
(stage 2) briefly and records, per forward, the sample keys this process saw; rank r writes OUT/rank{r}.json.
"""

import json
import os
import sys

import torch
from transformers import CLIPModel, TrainingArguments

import vlmdistill
from vlmdistill.data.image_text import build_image_text, decode_keys, image_transform_for
from vlmdistill.plugins.dcclip.data import ImageTextCollator, ImageTextShards

BATCH = 2


def train(dataset, collate, runtime, out, **args):
    torch.manual_seed(0)
    student = CLIPModel.from_pretrained(os.path.join(DATA, "student"))
    wrapped = vlmdistill.wrap(student, plugin="dcclip", stage=2, **runtime)
    seen = []
    wrapped.register_forward_pre_hook(lambda m, a, kw: seen.append(decode_keys(kw["sample_key"])), with_kwargs=True)
    defaults = dict(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=BATCH, learning_rate=1e-3,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
                    dataloader_num_workers=0, seed=0)
    defaults.update(args)
    trainer = vlmdistill.DistillationTrainer(model=wrapped, args=TrainingArguments(**defaults),
                                             train_dataset=dataset, data_collator=collate)
    trainer.train()
    return seen


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    student = CLIPModel.from_pretrained(os.path.join(DATA, "student"))

    dataset, collate, runtime = build_image_text(student, None, os.path.join(DATA, "folder"))
    runtime = {k: v for k, v in runtime.items() if k in ("student_tokenizer", "data_fingerprint")}
    results["folder"] = train(dataset, collate, runtime, out, num_train_epochs=2)

    tokenizer = runtime["student_tokenizer"]
    shards = ImageTextShards(os.path.join(DATA, "shards"), image_transform_for(student), tokenizer, max_length=32)
    shard_collate = ImageTextCollator(tokenizer.pad_token_id, pad_to=32)
    steps = len(dataset) // (2 * BATCH)  # one epoch over both processes
    results["shards_dispatched"] = train(shards, shard_collate, runtime, out, max_steps=steps)
    results["shards_per_process"] = train(shards, shard_collate, runtime, out, max_steps=steps,
                                          accelerator_config={"dispatch_batches": False})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    DATA = sys.argv[1]
    main(sys.argv[2])
