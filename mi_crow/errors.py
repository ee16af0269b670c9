"""The exceptions mi_crow raises on purpose.

Every class subclasses the built-in exception a caller would naturally catch, so ``except ValueError`` or
``except FileNotFoundError`` written without knowing mi_crow keeps working:

- :class:`MiCrowError` — the base of everything below; the CLI prints these as one line and exits with status 2.
- :class:`UserInputError` (``ValueError``) — an argument has a wrong value.
- :class:`ArgumentTypeError` (``UserInputError`` and ``TypeError``) — an argument has a wrong type. It is both a
  ``ValueError`` and a ``TypeError``, so the same mistake is caught by either clause wherever it is made.
- :class:`StoreError` — a store file is missing, corrupt, locked or cannot be written (subclasses in
  :mod:`mi_crow.store.errors` add ``FileNotFoundError`` / ``ValueError`` / ``PermissionError``).
- :class:`ResourceBusyError` (``StoreError`` and ``BlockingIOError``) — another process holds a lock.
- :class:`NotSupportedError` (``UserInputError`` and ``NotImplementedError``) — a valid request this version does not
  implement (an unknown architecture in a file, say).

Anything else that escapes the library is a bug: the CLI reports it as an internal error (exit status 1).

This module imports nothing, so every layer of the package (the ops included) may raise these.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "DistributedError",
    "MiCrowError",
    "NotSupportedError",
    "ResourceBusyError",
    "StoreError",
    "UserInputError",
]


class MiCrowError(Exception):
    """Base class of every error mi_crow raises deliberately (bad input, bad files); anything else is a bug."""


class UserInputError(MiCrowError, ValueError):
    """An argument's value is not what the function expects; the message names the argument, the value and the
    expectation."""


class ArgumentTypeError(UserInputError, TypeError):
    """An argument has the wrong type. Also a ``TypeError`` (and, through :class:`UserInputError`, a ``ValueError``)."""


class NotSupportedError(UserInputError, NotImplementedError):
    """A well-formed request that this version of mi_crow does not support (the message says what)."""


class StoreError(MiCrowError):
    """A store file or folder is missing, corrupt, locked or not writable; the message names its path."""


class DistributedError(MiCrowError, RuntimeError):
    """A collective of a ``torch.distributed`` run failed: another rank stopped (crashed, was killed) or did not
    answer within the process group's timeout. The message says what the run keeps and how to resume."""


class ResourceBusyError(StoreError, BlockingIOError):
    """Another process holds a lock on a run (the message names the lock file and the holder's pid)."""
