"""headstart: a folder of labelled photos to an image classifier, by transfer learning.

Examples:
    >>> import headstart
    >>> model = headstart.train("photos/", backbone="efficientnet_lite0")  # doctest: +SKIP
    >>> model.predict(["new.jpg"])  # doctest: +SKIP
    >>> model.save("my-model"); model = headstart.load("my-model")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from headstart.api import backbones as backbones
    from headstart.api import check as check
    from headstart.api import demo as demo
    from headstart.api import evaluate as evaluate
    from headstart.api import explain as explain
    from headstart.api import export as export
    from headstart.api import extract as extract
    from headstart.api import imagenet as imagenet
    from headstart.api import info as info
    from headstart.api import predict as predict
    from headstart.api import report as report
    from headstart.api import serve as serve
    from headstart.api import train as train
    from headstart.classifier import HeadClassifier as HeadClassifier
    from headstart.errors import HeadstartError as HeadstartError
    from headstart.model import Model as Model
    from headstart.model import Prediction as Prediction
    from headstart.model import Predictions as Predictions
    from headstart.model import load as load
    from headstart.triage import Triage as Triage

# Public names and the module each lives in; imported on first use so that
# `import headstart` (and `headstart --help`) does not pull in torch.
_EXPORTS = {
    "train": "headstart.api",
    "check": "headstart.api",
    "info": "headstart.api",
    "predict": "headstart.api",
    "evaluate": "headstart.api",
    "imagenet": "headstart.api",
    "backbones": "headstart.api",
    "demo": "headstart.api",
    "report": "headstart.api",
    "explain": "headstart.api",
    "export": "headstart.api",
    "extract": "headstart.api",
    "serve": "headstart.api",
    "load": "headstart.model",
    "Model": "headstart.model",
    "Prediction": "headstart.model",
    "Predictions": "headstart.model",
    "HeadClassifier": "headstart.classifier",
    "Triage": "headstart.triage",
    "HeadstartError": "headstart.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headstart' has no attribute '{name}'")
