"""PyProxy: run Python remotely from Python."""

from . import _native

PROTOCOL_VERSION = _native.PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
