"""Model adapters over real (tiny, randomly initialised) transformers and open_clip models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdistill.errors import ConfigError, DataError, UnsupportedModelError
from vlmdistill.eval.elevater import adapters
from vlmdistill.eval.elevater.classifier import encode_classifier
from vlmdistill.eval.elevater.demo import DIGIT_NAMES, DIGIT_TEMPLATES
from vlmdistill.eval.elevater.testing import (TINY_OPEN_CLIP_CONFIG, save_tiny_hf_model,
                                              tiny_open_clip)

TEXTS = [t.format(n) for lang in ("en", "zh") for t in DIGIT_TEMPLATES[lang] for n in DIGIT_NAMES[lang]]


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("model_type", ["clip", "siglip", "chinese_clip", "altclip"])
def test_hf_folder_adapter_matches_direct_model_calls(tmp_path, model_type):
    import transformers

    save_tiny_hf_model(str(tmp_path), model_type, TEXTS)
    adapter = adapters.load_model(str(tmp_path))
    assert adapter.kind == "transformers" and adapter.image_size == 32
    model = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    pixels = adapter.model_transform()(_image())
    assert torch.allclose(pixels, processor(images=_image(), return_tensors="pt")["pixel_values"][0])
    with torch.no_grad():
        expected_image = model(pixel_values=pixels[None], input_ids=torch.tensor([[2, 3]])).image_embeds
        padding = "max_length" if model_type == "siglip" else True
        tokens = tokenizer(TEXTS[:3], padding=padding, max_length=32, truncation=True, return_tensors="pt")
        expected_text = model(pixel_values=pixels[None].repeat(3, 1, 1, 1), **tokens).text_embeds
    # forward() returns normalised embeddings; the feature methods the adapter calls do not
    normalize = torch.nn.functional.normalize
    assert torch.allclose(normalize(adapter.encode_images(pixels[None]), dim=-1), normalize(expected_image, dim=-1),
                          atol=1e-5)
    assert torch.allclose(normalize(adapter.encode_texts(TEXTS[:3]), dim=-1), normalize(expected_text, dim=-1),
                          atol=1e-5)
    weights = encode_classifier(adapter, DIGIT_NAMES["zh"], DIGIT_TEMPLATES["zh"])
    assert weights.shape == (expected_text.shape[1], 10)


def test_in_memory_hf_model_with_its_tokenizer(tmp_path):
    import transformers

    save_tiny_hf_model(str(tmp_path), "clip", TEXTS)
    model = transformers.CLIPModel.from_pretrained(str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    adapter = adapters.adapter_for(model, tokenizer)
    folder_adapter = adapters.load_hf_model(str(tmp_path))
    assert adapter.fingerprint() == folder_adapter.fingerprint()
    assert torch.allclose(adapter.encode_texts(TEXTS[:2]), folder_adapter.encode_texts(TEXTS[:2]))


def test_open_clip_custom_config_and_local_checkpoint(tmp_path):
    model, tokenizer = tiny_open_clip(seed=3)
    checkpoint = tmp_path / "student.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    config = tmp_path / "arch.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    loaded = adapters.load_model("my-student-arch", pretrained=str(checkpoint), model_config=str(config))
    direct = adapters.adapter_for(model, tokenizer)
    assert loaded.kind == direct.kind == "open_clip"
    assert loaded.fingerprint() == direct.fingerprint()
    image = _image(1)
    assert torch.allclose(loaded.model_transform()(image), direct.model_transform()(image))
    pixels = direct.model_transform()(image)[None]
    assert torch.allclose(loaded.encode_images(pixels), model.encode_image(pixels).detach(), atol=1e-6)
    assert torch.allclose(loaded.encode_texts(["a photo of the digit one."]),
                          model.encode_text(tokenizer(["a photo of the digit one."])).detach(), atol=1e-6)


def test_open_clip_local_dir(tmp_path):
    model, _ = tiny_open_clip(seed=4)
    torch.save(model.state_dict(), tmp_path / "open_clip_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP_CONFIG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}}))
    loaded = adapters.load_model(str(tmp_path))
    assert loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.fingerprint() == adapters.adapter_for(model).fingerprint()


def test_loading_refuses_downloads_and_unknown_models(tmp_path):
    with pytest.raises(DataError, match="not downloaded"):
        adapters.load_model("ViT-B-32", pretrained="openai")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        adapters.load_model("no-such-arch")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="not one of"):
        adapters.load_model(str(tmp_path))


def test_generic_model_with_get_feature_methods():
    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image = torch.nn.Linear(3 * 8 * 8, 4)
            self.text = torch.nn.Embedding(10, 4)

        def get_image_features(self, pixel_values):
            return self.image(pixel_values.flatten(1))

        def get_text_features(self, input_ids, attention_mask=None):
            return self.text(input_ids).mean(1)

    model = TwoTowers()
    tokenize = lambda texts: {"input_ids": torch.tensor([[len(t) % 10] for t in texts]),  # noqa: E731
                              "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}
    adapter = adapters.adapter_for(model, tokenize, image_size=8)
    assert adapter.encode_texts(["ab", "abc"]).shape == (2, 4)
    assert adapter.encode_images(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    fingerprint = adapter.fingerprint()
    with torch.no_grad():
        model.text.weight[0, 0] += 1
    assert adapter.fingerprint() != fingerprint
    with pytest.raises(UnsupportedModelError, match="image_size"):
        adapters.adapter_for(model, tokenize)


def test_random_weights_are_refused_unless_asked_for(tmp_path):
    with pytest.raises(ConfigError, match="randomly initialised.*--random-weights"):
        adapters.load_model("ViT-B-32")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG,
                                                                "preprocess_cfg": {}}))
    with pytest.raises(DataError, match="no weights file"):
        adapters.load_model(str(tmp_path))
    torch.manual_seed(0)
    first = adapters.load_model(str(tmp_path), random_weights=True)
    assert first.kind == "open_clip"
    with pytest.raises(ConfigError, match="contradict"):
        adapters.load_model("ViT-B-32", pretrained=str(tmp_path / "x.pt"), random_weights=True)


def test_parameter_counts_count_the_image_tower(tmp_path):
    save_tiny_hf_model(str(tmp_path), "clip", TEXTS)
    hf = adapters.load_model(str(tmp_path))
    vision = sum(p.numel() for p in hf.model.vision_model.parameters()) + hf.model.visual_projection.weight.numel()
    counts = hf.parameter_counts()
    assert counts == {"num_params": sum(p.numel() for p in hf.model.parameters()), "num_visual_params": vision,
                      "num_backbone_params": counts["num_params"]}
    model, tokenizer = tiny_open_clip()
    assert adapters.adapter_for(model, tokenizer).parameter_counts()["num_visual_params"] == sum(
        p.numel() for p in model.visual.parameters())
