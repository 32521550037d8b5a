"""Model surgery: factorized modules, token merging, channel pruning, apply/save/load.

``vitrank.compress`` is both this package and the public function
``vitrank.compress(model, config, stats)`` (``vitrank.api.compress``): Python sets the
package as the ``compress`` attribute of ``vitrank`` as soon as any submodule is imported,
which would hide the function, so the package itself is made callable and forwards to it.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vitrank.api import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
