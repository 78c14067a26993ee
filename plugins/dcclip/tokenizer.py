"""A local English + Chinese tokenizer: byte-level BPE trained on the captions, as a transformers
`PreTrainedTokenizerFast` (save_pretrained / AutoTokenizer work; nothing is downloaded).

Byte-level BPE covers any UTF-8 text, so Chinese characters never fall out of the vocabulary; the
merges learnt from the captions make the frequent words and characters single tokens. Special ids
are fixed: <pad>=0, <unk>=1, <bos>=2, <eos>=3 (CLIP text towers pool at the first eos; an eos id of
2 would switch transformers' CLIP to its legacy argmax pooling, hence eos=3). `layout="xlm-r"` numbers
them as XLM-R does (<s>=0, <pad>=1, </s>=2, <unk>=3: AltCLIP's tokenizer), eos id 2 included.
"""

from __future__ import annotations

from typing import Iterable, Literal

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
#: name -> (special tokens in id order, (pad, unk, bos, eos) names)
LAYOUTS = {"default": (SPECIAL_TOKENS, ("<pad>", "<unk>", "<bos>", "<eos>")),
           "xlm-r": (["<s>", "<pad>", "</s>", "<unk>"], ("<pad>", "<unk>", "<s>", "</s>"))}


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int = 320, max_length: int = 32,
                            layout: Literal["default", "xlm-r"] = "default"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, (pad, unk, bos, eos) = LAYOUTS[layout]
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, specials.index(bos)), (eos, specials.index(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos,
                                   eos_token=eos, model_max_length=max_length)
