"""Environment variables read on every op call.

``os.environ.get`` encodes the key and decodes the value on each read: 0.6 us, which every op call paid once or
twice. On POSIX, ``os.environ`` keeps its contents in a dict of bytes that every assignment through
``os.environ`` (and ``monkeypatch.setenv``) updates: reading that dict costs 0.03 us.
"""
import os

_DATA = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict)


def read(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, without the per-read encoding where the platform allows."""
    if _FAST:
        value = _DATA.get(name.encode())
        return default if value is None else os.fsdecode(value)
    return os.environ.get(name, default)
