"""The dcclip demo's model builder for `vlmdistill train configs/dcclip/demo.yaml`: `dcclip-hf-clip`, a randomly
initialised transformers CLIP-family model sized by arguments, its vocabulary taken from a local tokenizer folder.
Registered when a recipe looks a builder up (the dcclip plugin names this module in `recipe_builders`)."""

from __future__ import annotations

from vlmdistill.recipes import register_model_builder


@register_model_builder("dcclip-hf-clip")
def build_hf_clip(tokenizer: str, family: str = "clip", hidden: int = 32, layers: int = 2, heads: int = 2,
                  patch: int = 8, image_size: int = 24, projection: int = 32, max_positions: int = 32, seed: int = 0):
    """A CLIPModel / AltCLIPModel / ChineseCLIPModel / SiglipModel whose text tower fits `tokenizer`. A CLIP text
    tower pools at the tokenizer's end-of-text id; one it cannot pool at (XLM-R's `</s>` = 2, which transformers
    reads as its legacy highest-id rule) is refused, naming the families that pool otherwise."""
    from transformers import AutoTokenizer

    from vlmdistill.eval.tiny_models import tiny_hf_clip
    from vlmdistill.hf import from_local_folder
    from vlmdistill.plugins.dcclip.compat import check_eos_pooling

    tok = from_local_folder(AutoTokenizer, tokenizer, role="tokenizer")
    model = tiny_hf_clip(family, hidden=hidden, layers=layers, heads=heads, patch=patch, image_size=image_size,
                         vocab=len(tok), max_positions=max_positions, projection=projection,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed)
    check_eos_pooling(model, tok, f"dcclip-hf-clip model (family {family!r})")
    return model
