"""Data pipelines on local files (nothing here downloads anything): chat conversations (`conversations`, `chat`),
image–text pairs (`image_text`), text blocks and the tokenizer trainer (`text`), text-recognition LMDBs
(`text_lmdb`), the image statistics models normalise with (`image_stats`) and the bundled demo data (`digits`:
digit images and captions; `rendered_words`: words rendered into text images)."""
