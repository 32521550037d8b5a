"""How a candidate scores: proxies, accuracy, measured latency, distillation fine-tuning.

`calibrate` (calibration statistics) lives in `evaluators.calibration` and is re-exported
here lazily, like the proxies, so that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitrank.evaluators._data import gather
from vitrank.evaluators.accuracy import correct_predictions, evaluate_accuracy, predicted_logits
from vitrank.evaluators.comparison import LATENCY_REPEATS, LATENCY_WARMUP, compare_with_teacher
from vitrank.evaluators.fidelity import Fidelity, rank_fidelity
from vitrank.evaluators.finetune import (
    RECIPE,
    FinetuneResult,
    Recipe,
    finetune,
    finetune_trainable,
)
from vitrank.evaluators.latency import LatencyResult, measure_latency
from vitrank.evaluators.significance import McNemar, mcnemar

# Names whose modules import the compression code (and calibration); loaded on first use.
_LAZY = {
    "calibrate": "vitrank.evaluators.calibration",
    "Proxy": "vitrank.evaluators.proxies",
    "ProxyInputs": "vitrank.evaluators.proxies",
    "SpectralProxy": "vitrank.evaluators.proxies",
    "LogitsProxy": "vitrank.evaluators.proxies",
    "create_proxy": "vitrank.evaluators.proxies",
    "get_proxy": "vitrank.evaluators.proxies",
    "heldout_batch": "vitrank.evaluators.proxies",
    "proxy_names": "vitrank.evaluators.proxies",
    "measure_sensitivity": "vitrank.evaluators.proxies",
}

__all__ = [
    "LATENCY_REPEATS",
    "LATENCY_WARMUP",
    "McNemar",
    "RECIPE",
    "Recipe",
    "compare_with_teacher",
    "correct_predictions",
    "mcnemar",
    "Fidelity",
    "FinetuneResult",
    "LatencyResult",
    "evaluate_accuracy",
    "finetune",
    "finetune_trainable",
    "gather",
    "measure_latency",
    "predicted_logits",
    "rank_fidelity",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitrank.evaluators' has no attribute {name!r}")
