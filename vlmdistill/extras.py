"""Optional packages: which extra of `pip install vlmdistill[...]` brings each, and one clear error where a feature
needs one that is missing. The base install (wrap, every plugin's losses, training, recipes, checkpoints) needs
none of them; they are imported only inside the features that use them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# top-level module -> (distribution name, extra)
OPTIONAL = {
    "webdataset": ("webdataset", "webdataset"),
    "sklearn": ("scikit-learn", "demo"),
    "matplotlib": ("matplotlib", "demo"),
    "skimage": ("scikit-image", "eval"),
    "lmdb": ("lmdb", "lmdb"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "triton": ("triton", None),  # Linux only, a base requirement there
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise MissingDependencyError naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if top not in OPTIONAL or (error.name or "").split(".")[0] != top:
            raise
        package, extra = OPTIONAL[top]
        how = f"pip install 'vlmdistill[{extra}]'" if extra else f"pip install {package} (Linux only)"
        raise MissingDependencyError(f"{feature} needs the optional package {package}, which is not installed: "
                                     f"{how}") from error
