"""How a candidate scores: proxies, accuracy, measured latency, distillation fine-tuning.

`calibrate` (calibration statistics) lives in `evaluators.calibration` and is re-exported
here lazily, like the proxies, so that importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from evaluators._data import gather
from evaluators.accuracy import correct_predictions, evaluate_accuracy, predicted_logits
from evaluators.comparison import LATENCY_REPEATS, LATENCY_WARMUP, compare_with_teacher
from evaluators.fidelity import Fidelity, rank_fidelity
from evaluators.finetune import FinetuneResult, finetune, finetune_trainable
from evaluators.latency import LatencyResult, measure_latency
from evaluators.significance import McNemar, mcnemar

# Names whose modules import the compression code (and calibration); loaded on first use.
_LAZY = {
    "calibrate": "evaluators.calibration",
    "Proxy": "evaluators.proxies",
    "ProxyInputs": "evaluators.proxies",
    "SpectralProxy": "evaluators.proxies",
    "LogitsProxy": "evaluators.proxies",
    "create_proxy": "evaluators.proxies",
    "get_proxy": "evaluators.proxies",
    "heldout_batch": "evaluators.proxies",
    "proxy_names": "evaluators.proxies",
    "measure_sensitivity": "evaluators.proxies",
}

__all__ = [
    "LATENCY_REPEATS",
    "LATENCY_WARMUP",
    "McNemar",
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
    raise AttributeError(f"module 'evaluators' has no attribute {name!r}")
