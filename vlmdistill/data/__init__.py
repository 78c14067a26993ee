"""Data pipelines on local files (nothing here downloads anything): chat conversations (`conversations`, `chat`),
image–text pairs (`image_text`), text blocks (`text`), text-recognition LMDBs (`text_lmdb`) and the bundled demo
data (`digits`)."""
