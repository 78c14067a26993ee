"""Teacher-feature cache: same stage-1 loss as the live teacher with no teacher forward; stale caches
(other teacher, other taps, other preprocessing, changed inputs) refused."""

import json
import os

import pytest
import torch

import vlmdistill
from vlmdistill.errors import DataError
from vlmdistill.plugins.dcclip.cache import TeacherFeatureCache
from vlmdistill.eval.tiny_models import tiny_hf_clip
from image_text_fixtures import token_batch


def _student():
    return tiny_hf_clip(hidden=16, layers=1, patch=8, seed=1)


def _teacher(seed=2):
    return tiny_hf_clip(hidden=32, layers=1, patch=4, projection=24, seed=seed)


def _batches(n_batches=3, size=4):
    out = []
    for b in range(n_batches):
        tokens = token_batch(size, seed=b)
        g = torch.Generator().manual_seed(50 + b)
        out.append({**tokens, "pixel_values": torch.randn(size, 3, 32, 32, generator=g),
                    "sample_key": [f"img{b}_{i}" for i in range(size)],
                    "augmentation_seed": torch.full((size,), b % 2)})
    return out


CONFIG = {"embedding_weight": 0.5}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cache") / "teacher_cache")
    builder = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), config=CONFIG, data_fingerprint="pp-1")
    builder.plugin.build_teacher_cache(_batches(), directory, samples_per_shard=5, progress=False)
    return directory


def test_cache_layout(cache_dir):
    with open(os.path.join(cache_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["num_samples"] == 12 and [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    assert set(manifest["features"]) == {"image_map", "image_embeds", "text_embeds", "text_tokens"}
    assert manifest["features"]["image_map"] == [32, 8, 8] and manifest["data_fingerprint"] == "pp-1"
    cache = TeacherFeatureCache(cache_dir)
    assert len(cache) == 12 and ("img2_3", 0) in cache and ("img1_0", 1) in cache


def test_cached_and_live_teacher_give_the_same_stage1_loss_and_gradients(cache_dir):
    teacher = _teacher()
    calls = []
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)
    live = vlmdistill.wrap(_student(), plugin="dcclip", teacher=teacher, config=CONFIG)
    torch.manual_seed(0)
    cached = vlmdistill.wrap(_student(), plugin="dcclip", teacher=teacher,
                             config={**CONFIG, "teacher_cache": cache_dir}, data_fingerprint="pp-1")
    for batch in _batches():
        out_live = live(**batch)
        n_live = len(calls)
        out_cached = cached(**batch)
        assert len(calls) == n_live  # the cached path ran no teacher forward
        for name in out_live.loss_terms:
            torch.testing.assert_close(out_cached.loss_terms[name], out_live.loss_terms[name], rtol=1e-5, atol=1e-6)
        out_live.loss.backward()
        out_cached.loss.backward()
    live_grads = dict(live.named_parameters())
    for name, p in cached.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, live_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert cached.plugin.cache.hits == 12


def test_cache_without_a_teacher_trains_stage1(cache_dir):
    manifest = json.load(open(os.path.join(cache_dir, "manifest.json")))
    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", config={
        **CONFIG, "teacher_cache": cache_dir, "teacher_fingerprint": manifest["teacher_fingerprint"]})
    assert wrapped.plugin.adapters["image"].out_channels == 32  # teacher widths come from the manifest
    out = wrapped(**_batches()[0])
    assert set(out.loss_terms) == {"image", "text", "image_embed", "text_embed"}
    with pytest.raises(DataError, match="stale.*fingerprint"):
        vlmdistill.wrap(_student(), plugin="dcclip", config={**CONFIG, "teacher_cache": cache_dir,
                                                            "teacher_fingerprint": "0" * 32})


def test_stale_cache_is_refused(cache_dir):
    with pytest.raises(DataError, match="stale: it was built from a teacher with fingerprint"):
        vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(seed=7),
                        config={**CONFIG, "teacher_cache": cache_dir})
    with pytest.raises(DataError, match="stale: built with teacher taps"):
        vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), config={
            **CONFIG, "teacher_cache": cache_dir,
            "teacher_taps": {"image_module": "vision_model.encoder.layers.0", "image_prefix_tokens": 1}})
    with pytest.raises(DataError, match="stale: built for data preprocessing pp-1"):
        vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), config={**CONFIG, "teacher_cache": cache_dir},
                        data_fingerprint="pp-2")

    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(),
                              config={**CONFIG, "teacher_cache": cache_dir})
    batch = _batches()[1]
    changed = {**batch, "pixel_values": batch["pixel_values"] * 1.01}  # e.g. another normalisation
    with pytest.raises(DataError, match=r"stale for sample 'img1_0'.*pixels differ"):
        wrapped(**changed)
    tokens = batch["input_ids"].clone()
    tokens[2, 1] = 63 if tokens[2, 1] != 63 else 62
    with pytest.raises(DataError, match=r"stale for sample 'img1_2'.*token ids differ"):
        wrapped(**{**batch, "input_ids": tokens})
    with pytest.raises(DataError, match=r"no features for sample 'img1_0' with augmentation seed 0"):
        wrapped(**{**batch, "augmentation_seed": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(DataError, match="sample_key"):
        wrapped(**{k: v for k, v in batch.items() if k != "sample_key"})


def test_cache_miss_can_fall_back_to_the_teacher(cache_dir):
    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(),
                              config={**CONFIG, "teacher_cache": cache_dir, "cache_miss": "teacher"})
    batch = {**_batches()[0], "sample_key": [f"new{i}" for i in range(4)]}
    assert torch.isfinite(wrapped(**batch).loss)
    assert wrapped.plugin.cache.misses == 4


def test_cache_directory_must_be_new(cache_dir):
    builder = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher())
    with pytest.raises(DataError, match="not empty"):
        builder.plugin.build_teacher_cache(_batches(1), cache_dir, progress=False)


LOOKUP_MEMORY = """
import json, os, sys
from vlmdistill.plugins.dcclip.cache import TeacherFeatureCache

def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cache = TeacherFeatureCache(sys.argv[1])
cache.lookup(["s0_0", "s1_0"], [0, 0], None)  # first-use allocations of the libraries, not of the cache
keys = [f"s{s}_{i}" for s in range(2) for i in (3, 40, 41, 90)]
before = resident()
features = cache.lookup(keys, [0] * len(keys), None)
print(json.dumps({"grown": resident() - before, "sums": features.image_map.flatten(1).sum(1).tolist(),
                  "open_files": cache.open_files}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_lookups_read_rows_not_whole_shards(tmp_path):
    """Two shards of 48 MiB of image maps: looking up 8 samples spread over both reads 8 rows (4 MiB; ~20 MiB of
    resident memory with the readers' buffers), where loading whole shards took 96 MiB. Measured in a fresh
    process, whose allocator has not kept earlier blocks."""
    import subprocess
    import sys

    from vlmdistill.plugins.dcclip.cache import TeacherCacheWriter
    from vlmdistill.plugins.dcclip.features import TowerFeatures

    per_shard = 96  # 128 x 32 x 32 fp32 = 512 KiB per sample
    writer = TeacherCacheWriter(str(tmp_path / "cache"), samples_per_shard=per_shard)
    sums = []
    for shard in range(2):
        maps = torch.randn(per_shard, 128, 32, 32, generator=torch.Generator().manual_seed(shard))
        writer.add([f"s{shard}_{i}" for i in range(per_shard)], torch.zeros(per_shard, dtype=torch.long),
                   TowerFeatures(image_map=maps), ids=None, pixels=None)
        sums += maps[[3, 40, 41, 90]].flatten(1).sum(1).tolist()
    writer.close()
    run = subprocess.run([sys.executable, "-c", LOOKUP_MEMORY, str(tmp_path / "cache")], capture_output=True,
                         text=True, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["sums"] == pytest.approx(sums, rel=1e-5)  # the right rows, in the batch's order
    assert measured["grown"] < 40 * 2**20, f"resident memory grew by {measured['grown'] / 2**20:.0f} MiB"
    assert measured["open_files"] == 2


def test_cache_is_released_at_the_switch(cache_dir):
    wrapped = vlmdistill.wrap(_student(), plugin="dcclip", config={**CONFIG, "teacher_cache": cache_dir,
                                                                  "switch_at_step": 1}, data_fingerprint="pp-1",
                              teacher=_teacher())
    wrapped(**_batches()[0]).loss.backward()
    cache = wrapped.plugin.cache
    assert cache.open_files > 0
    wrapped.step_end()
    assert wrapped.plugin.cache is None and cache.open_files == 0
    assert set(wrapped(**_batches()[1]).loss_terms) == {"contrastive"}


def test_cache_records_the_teachers_tokenizer_and_refuses_another_student_tokenizer(tmp_path):
    """Without a teacher at wrap time the cache is the teacher: token-level text distillation from it needs the
    tokenizer its features were computed with."""
    from vlmdistill.errors import IncompatibleTeacherError
    from vlmdistill.data.text import train_caption_tokenizer
    from vlmdistill.vocab import tokenizer_identity

    teacher_tok = train_caption_tokenizer(["a photo of the digit one.", "数字一的照片。"], vocab_size=300)
    other_tok = train_caption_tokenizer(["a handwritten nine.", "手写的九。"], vocab_size=300)
    directory = str(tmp_path / "cache")
    builder = vlmdistill.wrap(_student(), plugin="dcclip", teacher=_teacher(), config=CONFIG,
                              student_tokenizer=teacher_tok, teacher_tokenizer=teacher_tok)
    builder.plugin.build_teacher_cache(_batches(1), directory, progress=False)
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    assert manifest["teacher_tokenizer"] == tokenizer_identity(teacher_tok)
    config = {**CONFIG, "teacher_cache": directory, "teacher_fingerprint": manifest["teacher_fingerprint"]}
    with pytest.raises(IncompatibleTeacherError, match="differs from the tokenizer the cached teacher features"):
        vlmdistill.wrap(_student(), plugin="dcclip", config=config, student_tokenizer=other_tok)
    vlmdistill.wrap(_student(), plugin="dcclip", config=config, student_tokenizer=teacher_tok)
    # pooled text embeddings allow any pair of tokenizers
    vlmdistill.wrap(_student(), plugin="dcclip", config={**config, "text_level": "pooled"}, student_tokenizer=other_tok)
