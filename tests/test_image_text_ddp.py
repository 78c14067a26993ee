"""Two processes under the HF Trainer (accelerate, gloo): every sample is seen exactly once per epoch.

Before: webdataset batches (a list of string keys) crashed accelerate's batch dispatcher, and with dispatch off
the reader split shards by rank on top of accelerate's own split, so each process saw 1/W² of the data."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from image_text_fixtures import caption, caption_tokenizer, image, save_clip_folder, write_image_folder

WORKER = os.path.join(os.path.dirname(__file__), "image_text_ddp_worker.py")
N = 16  # a multiple of 2 processes x batch 2: no batch is completed with repeated samples


def _write_data(root):
    from vlmdistill.plugins.dcclip.data import ImageTextSample, write_image_text_shards

    rows = write_image_folder(root / "folder", n=N)
    samples = [ImageTextSample(f"shard_sample_{i:02d}", image(i), caption(i), ("en", "zh")[i % 2]) for i in range(N)]
    write_image_text_shards(samples, str(root / "shards"), samples_per_shard=4)
    save_clip_folder(root / "student", caption_tokenizer(), image_size=16, hidden=16, layers=1)
    return [r["file_name"] for r in rows], [s.key for s in samples]


@pytest.mark.slow
def test_each_sample_once_per_epoch_across_two_processes(tmp_path):
    folder_keys, shard_keys = _write_data(tmp_path)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "0", WORKER, str(tmp_path), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    steps = N // 4
    for epoch in range(2):  # map-style folder: a distributed sampler, two epochs
        parts = [sum(r["folder"][epoch * steps:(epoch + 1) * steps], []) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == N // 2
        assert sorted(parts[0] + parts[1]) == sorted(folder_keys), f"epoch {epoch}"
    for mode in ("shards_dispatched", "shards_per_process"):  # webdataset, both accelerate loading modes
        parts = [sum(r[mode], []) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == N // 2, mode
        assert sorted(parts[0] + parts[1]) == sorted(shard_keys), mode
