"""A local English + Chinese tokenizer: byte-level BPE trained on the captions, as a transformers
`PreTrainedTokenizerFast` (save_pretrained / AutoTokenizer work; nothing is downloaded).

Byte-level BPE covers any UTF-8 text, so Chinese characters never fall out of the vocabulary; the
merges learnt from the captions make the frequent words and characters single tokens. Special ids
are fixed: <pad>=0, <unk>=1, <bos>=2, <eos>=3 (CLIP text towers pool at the first eos; an eos id of
2 would switch transformers' CLIP to its legacy argmax pooling, hence eos=3).
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int = 320, max_length: int = 32):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)
