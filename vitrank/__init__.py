"""vitrank: automatic compression of Vision Transformers.

The public API, imported lazily so that `import vitrank` stays cheap:

- `load_workload`: a teacher ViT with train / calibration / validation data
- `compress`: build a compressed model from a `CompressionConfig` and calibration statistics
- `save` / `load`: a compressed model as model.safetensors + config.json
- `search`: the Pareto search against a budget
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_workload": "vitrank.workloads",
    "Workload": "vitrank.workloads",
    "compress": "vitrank.api",
    "save": "vitrank.api",
    "load": "vitrank.api",
    "search": "vitrank.api",
    "inspect_vit": "vitrank.core.structure",
    "UnsupportedModelError": "vitrank.core.structure",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vitrank' has no attribute {name!r}")
