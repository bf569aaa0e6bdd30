"""Shared fixtures: real loopback servers for the gateway tests (tests/loopback.py)."""

from tests.loopback import gate, upstream

__all__ = ["gate", "upstream"]
