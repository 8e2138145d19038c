"""Errors distmlip raises that are its own types (the rest are ``ValueError``/``TypeError`` naming
the argument at fault). Importable from ``distmlip`` and ``distmlip.runtime`` too."""

from __future__ import annotations

__all__ = ["CommunicationError"]


class CommunicationError(RuntimeError):
    """A peer rank failed, died or did not answer in time. ``peers``: the ranks this one was
    waiting for, if known. ``printed``: the message was already written to stderr (the runner
    does so at once, before a launcher may kill the process), so a caller need not repeat it."""

    def __init__(self, message: str, peers=(), printed: bool = False):
        super().__init__(message)
        self.peers = list(peers)
        self.printed = printed
