"""The module path of the original mi-crow documentation: ``from mi_crow.store.local_store import LocalStore``.

A thin alias of :mod:`mi_crow.store`; the classes live in :mod:`mi_crow.store.local` and :mod:`mi_crow.store.base`.
"""

from mi_crow.store.base import Store
from mi_crow.store.local import LocalStore

__all__ = ["LocalStore", "Store"]
