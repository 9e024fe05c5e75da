"""One value per live object, made at its first use and dropped with the object (a weak-keyed cache)."""
from __future__ import annotations

import threading
import weakref
from typing import Callable, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def per_object(make: Callable[[K], V]) -> Callable[[K], V]:
    """`make(obj)` once per live `obj` (thread-safe); e.g. what is read of, or kept beside, one model."""
    values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def get(obj: K) -> V:
        with lock:
            value = values.get(obj)
            if value is None:
                value = values[obj] = make(obj)
            return value

    return get
