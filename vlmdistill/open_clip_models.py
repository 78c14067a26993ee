"""open_clip models from local files only (recipes' `student/teacher: {builder: open-clip, ...}`).

    {builder: open-clip, kwargs: {model: ViT-B-32, checkpoint: weights/open_clip_pytorch_model.bin}}
    {builder: open-clip, kwargs: {config: arch/my-vit.json, checkpoint: weights/epoch_32.pt}}
    {builder: open-clip, kwargs: {model: local-dir:exports/student}}      # open_clip_config.json + weights

`model` is a built-in open_clip architecture name (or `local-dir:FOLDER`, open_clip's own export layout);
`config` a local architecture JSON (`embed_dim`, `vision_cfg`, `text_cfg`, as in open_clip's model_configs), made
creatable under the file's stem. Pretrained *tags* and `hf-hub:` names download, so they are refused: give the
checkpoint file. The architecture config is kept on the model as `open_clip_model_cfg`, so an export can write
`open_clip_config.json` beside the weights.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

from .errors import ConfigError


def _read_architecture(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"open_clip config {path!r} is not a local file")
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg = cfg.get("model_cfg", cfg)  # open_clip_config.json of a local-dir export, or a bare architecture
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ConfigError(f"open_clip config {path} lacks {sorted(missing)}")
    return cfg


def register_open_clip_config(name: str, config: Mapping[str, Any]) -> str:
    """Make a custom open_clip architecture (a config dict with embed_dim/vision_cfg/text_cfg) creatable under
    `name`, through open_clip's public `add_model_config` (it reads its registry from files); returns the name."""
    import open_clip

    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise ConfigError(f"open_clip config {name!r} lacks {sorted(missing)}")
    if not name or "/" in name or os.sep in name:
        raise ConfigError(f"open_clip architecture name {name!r}: give a plain name (open_clip keys configs by "
                          "file name)")
    path = os.path.join(_config_directory(), f"{name}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dict(config), handle)
    open_clip.add_model_config(path)
    return name


_CONFIG_DIRECTORY: list[str] = []


def _config_directory() -> str:
    """One temporary folder per process for registered configs, removed at exit."""
    if not _CONFIG_DIRECTORY:
        import atexit
        import shutil
        import tempfile

        _CONFIG_DIRECTORY.append(tempfile.mkdtemp(prefix="open_clip_configs_"))
        atexit.register(shutil.rmtree, _CONFIG_DIRECTORY[0], ignore_errors=True)
    return _CONFIG_DIRECTORY[0]


def _check_local_towers(cfg: dict, where: str) -> None:
    """Towers that open_clip builds from the Hugging Face hub or timm weights would download."""
    hf_name = cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_name and not os.path.isdir(hf_name):
        raise ConfigError(f"{where}: its text tower is the transformers model {hf_name!r}, which is not a local "
                          "folder (nothing is downloaded); set text_cfg.hf_model_name to a local folder")


def load_open_clip(model: Optional[str] = None, checkpoint: Optional[str] = None, config: Optional[str] = None,
                   **create_kwargs: Any):
    """An open_clip model built and loaded from local files; see the module docstring for the forms."""
    import open_clip

    if model is None and config is None:
        raise ConfigError("open-clip: give model (an architecture name or local-dir:FOLDER) or config (a JSON file)")
    if config is not None:
        cfg = _read_architecture(config)
        name = register_open_clip_config(model or os.path.splitext(os.path.basename(config))[0], cfg)
    elif model.startswith("hf-hub:"):
        raise ConfigError(f"open-clip model {model!r} would be downloaded from the hub; give a local checkpoint "
                          "file with the architecture name, or local-dir:FOLDER")
    elif model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        cfg = _read_architecture(os.path.join(folder, "open_clip_config.json"))
        name = model
    else:
        name = model.replace("/", "-")
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"unknown open_clip architecture {model!r}; built-in: "
                              f"{', '.join(open_clip.list_models())} (or give config: a local architecture JSON)")
    _check_local_towers(cfg, f"open_clip architecture {name!r}")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ConfigError(f"open-clip checkpoint {checkpoint!r} is not a local file (pretrained tags download "
                          "weights; nothing is downloaded)")
    if checkpoint is not None and name.startswith("local-dir:"):
        raise ConfigError("open-clip: local-dir: folders carry their own weights; do not also give checkpoint")
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights when none are given
    try:
        built = open_clip.create_model(name, pretrained=checkpoint, pretrained_image=False, pretrained_text=False,
                                       require_pretrained=checkpoint is not None, **create_kwargs)
    finally:
        logging.getLogger().setLevel(previous)
    built.open_clip_model_cfg = dict(cfg)
    return built
