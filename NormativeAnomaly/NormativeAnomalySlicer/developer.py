"""Developer-mode helpers: reloading the module's packages after an edit."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Iterable


def reloadPackages(prefixes: Iterable[str]) -> list[str]:
    """Reload every loaded module of the packages named by ``prefixes``, the deepest first (a leaf
    module is reloaded before the packages that import names from it). Returns their names in the
    order reloaded. Modules never imported in this process (torch's side) are left alone."""
    prefixes = tuple(prefixes)
    names = [name for name, module in list(sys.modules.items())
             if isinstance(module, ModuleType) and (name in prefixes or name.startswith(tuple(p + "." for p in prefixes)))]
    names.sort(key=lambda name: (-name.count("."), name))
    for name in names:
        importlib.reload(sys.modules[name])
    return names
