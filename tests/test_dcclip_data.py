"""Image–text webdataset shards: round trip, en/zh collation, broken shards, deterministic augmentation."""

import logging
import os

import numpy as np
import pytest
import torch

from vlmdistill.data.image_text import decode_keys
from vlmdistill.errors import DataError
from vlmdistill.plugins.dcclip.data import (ClipImageTransform, ImageTextCollator, ImageTextSample, ImageTextShards,
                                            write_image_text_shards)
from vlmdistill.data.text import train_caption_tokenizer


CAPTIONS = {"en": "a photo of the digit {}.", "zh": "数字{}的照片。"}
NAMES = {"en": ["zero", "one", "two", "three"], "zh": ["零", "一", "二", "三"]}


def _image(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _samples(n=10):
    out = []
    for i in range(n):
        language = "en" if i % 2 == 0 else "zh"
        out.append(ImageTextSample(f"s{i:03d}_{language}", _image(i), CAPTIONS[language].format(NAMES[language][i % 4]),
                                   language))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [CAPTIONS[lang].format(name) for lang in NAMES for name in NAMES[lang]]
    return train_caption_tokenizer(texts, vocab_size=300)


@pytest.fixture()
def shards(tmp_path):
    write_image_text_shards(_samples(10), str(tmp_path / "shards"), samples_per_shard=4)
    return str(tmp_path / "shards")


def _dataset(shards, tokenizer, **kw):
    return ImageTextShards(shards, ClipImageTransform(16), tokenizer, **kw)


def test_round_trip_keeps_keys_captions_languages_and_pixels(shards, tokenizer):
    items = list(_dataset(shards, tokenizer))
    expected = {s.key: s for s in _samples(10)}
    assert [it["sample_key"] for it in items] == sorted(expected)
    transform = ClipImageTransform(16)
    from PIL import Image

    for it in items:
        sample = expected[it["sample_key"]]
        assert it["caption"] == sample.caption and it["language"] == sample.language
        assert tokenizer.decode(it["input_ids"], skip_special_tokens=True) == sample.caption
        torch.testing.assert_close(it["pixel_values"], transform(Image.fromarray(sample.image)))
        assert it["augmentation_seed"] == 0


def test_mixed_english_chinese_batch_collation(shards, tokenizer):
    items = list(_dataset(shards, tokenizer))[:4]
    assert {it["language"] for it in items} == {"en", "zh"}
    batch = ImageTextCollator(tokenizer.pad_token_id, keep_metadata=True)(items)
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert decode_keys(batch["sample_key"]) == [it["sample_key"] for it in items]  # bytes: a tensor
    assert batch["language"] == [it["language"] for it in items]
    assert batch["augmentation_seed"].tolist() == [0, 0, 0, 0]
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (4, max(lengths)) and len(set(lengths)) > 1  # en and zh differ in length
    for row, it, n in zip(range(4), items, lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(batch["input_ids"][row, :n], skip_special_tokens=True) == it["caption"]
    plain = ImageTextCollator(tokenizer.pad_token_id)(items)
    assert "language" not in plain and "caption" not in plain  # only model inputs and cache keys by default


def test_open_clip_style_uses_its_own_names(shards):
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    ds = ImageTextShards(shards, ClipImageTransform(16), tok, style="open_clip", languages=["en"])
    items = list(ds)
    assert len(items) == 5 and all(it["language"] == "en" for it in items)
    batch = ImageTextCollator(style="open_clip")(items)
    assert batch["image"].shape == (5, 3, 16, 16) and batch["text"].shape == (5, 16)


def _corrupt(path):
    with open(path, "wb") as fh:
        fh.write(b"this is not a tar file" * 50)


def test_corrupt_and_missing_shards_are_named_counted_and_skipped(shards, tokenizer, caplog):
    _corrupt(os.path.join(shards, "shard-00001.tar"))
    os.remove(os.path.join(shards, "shard-00002.tar"))
    ds = _dataset(shards, tokenizer, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vlmdistill.dcclip.data"):
        items = list(ds)
    assert [it["sample_key"] for it in items] == sorted(s.key for s in _samples(10))[:4]
    assert ds.stats.samples == 4 and ds.stats.skipped_samples == 6  # 4 in the corrupt shard + 2 in the missing one
    assert set(map(os.path.basename, ds.stats.failed_shards)) == {"shard-00001.tar", "shard-00002.tar"}
    assert "shard-00001.tar" in caplog.text and "shard-00002.tar" in caplog.text

    with pytest.raises(DataError, match="shard-00001.tar"):
        list(_dataset(shards, tokenizer, on_error="stop"))


def test_missing_shard_stops_with_its_name(shards, tokenizer):
    os.remove(os.path.join(shards, "shard-00000.tar"))
    with pytest.raises(DataError, match=r"shard-00000\.tar"):
        list(_dataset(shards, tokenizer, on_error="stop"))


def test_undecodable_sample_is_skipped_and_counted(tmp_path, tokenizer):
    samples = _samples(3)
    samples[1] = ImageTextSample(samples[1].key, b"not a png", samples[1].caption, samples[1].language)
    write_image_text_shards(samples, str(tmp_path / "s"))
    ds = _dataset(str(tmp_path / "s"), tokenizer)
    assert len(list(ds)) == 2 and ds.stats.skipped_samples == 1
    with pytest.raises(DataError, match="s001_zh.*cannot be decoded"):
        list(_dataset(str(tmp_path / "s"), tokenizer, on_error="stop"))


def test_shuffling_mixes_shards_and_is_reproducible(tmp_path, tokenizer):
    write_image_text_shards(_samples(40), str(tmp_path / "s"), samples_per_shard=10)
    keys = lambda **kw: [it["sample_key"] for it in _dataset(str(tmp_path / "s"), tokenizer, **kw)]  # noqa: E731
    a = keys(shuffle_buffer=16, shardshuffle=4, seed=3)
    assert a == keys(shuffle_buffer=16, shardshuffle=4, seed=3) and sorted(a) == sorted(keys())
    assert a != keys() and a != keys(shuffle_buffer=16, shardshuffle=4, seed=4)


def test_augmentation_is_deterministic_per_key_and_seed():
    from PIL import Image

    transform = ClipImageTransform(16, augment="random_resized_crop", crop_scale=(0.3, 0.6))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    a = transform(image, "k1", 0)
    torch.testing.assert_close(transform(image, "k1", 0), a)
    assert not torch.equal(transform(image, "k1", 1), a) and not torch.equal(transform(image, "k2", 0), a)


def test_fingerprint_changes_with_preprocessing(shards, tokenizer):
    base = _dataset(shards, tokenizer).fingerprint()
    assert base == _dataset(shards, tokenizer).fingerprint()
    assert base != ImageTextShards(shards, ClipImageTransform(24), tokenizer).fingerprint()
    assert base != ImageTextShards(shards, ClipImageTransform(16, mean=(0.5,) * 3, std=(0.5,) * 3),
                                   tokenizer).fingerprint()


def test_rejects_bad_keys_and_languages(tmp_path):
    with pytest.raises(DataError, match="keys may not"):
        write_image_text_shards([ImageTextSample("a.b", _image(0), "x", "en")], str(tmp_path / "a"))
    with pytest.raises(DataError, match="language 'fr'"):
        write_image_text_shards([ImageTextSample("ab", _image(0), "x", "fr")], str(tmp_path / "b"))


def test_tokenizer_identity_ignores_call_time_truncation(tokenizer):
    from vlmdistill.plugins.dcclip.compat import tokenizer_identity

    before = tokenizer_identity(tokenizer)
    tokenizer("a photo of the digit one.", truncation=True, max_length=5)
    assert tokenizer_identity(tokenizer) == before


def test_training_preprocessing_is_the_elevater_harness_preprocessing():
    """What the student trains on is, pixel for pixel, what the zero-shot harness shows it."""
    from PIL import Image

    from vlmdistill.eval.elevater.protocol import elevater_transform
    from vlmdistill.data.image_stats import OPENAI_MEAN, OPENAI_STD

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8))
    assert torch.equal(ClipImageTransform(16)(image), elevater_transform(16, OPENAI_MEAN, OPENAI_STD)(image))
