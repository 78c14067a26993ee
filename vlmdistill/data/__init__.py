"""Data pipelines (chat conversations: `conversations` + `chat`; image-text pairs: `image_text`) and the bundled
data of the demos (`digits`, `text`). Everything reads local files: nothing here downloads anything."""
