"""The dnsdisco exception tree.

Every error the library raises on purpose derives from :class:`DnsdiscoError`; only
``dnsdisco.cli`` turns one into an exit code. The tree:

* :class:`DnsdiscoError`
  * :class:`ConfigError` - a configuration file, flag or value is wrong; ``str()`` names the
    source (file or flag) and the key, so an operator can fix it without reading code.
  * :class:`CatalogError` - a catalog operation was refused. Carries the HTTP ``status`` the
    Consul API gives for it and a ``message`` in Consul's wording (for example 400
    ``Missing service name``, 404 ``Unknown check ID "x". ...``), so the HTTP layer can answer
    it verbatim.
    * :class:`DecodeError` - a request body or definition could not be decoded (400).
    * :class:`StorageError` - the data dir refused a write (500); nothing was changed.
"""

from __future__ import annotations


class DnsdiscoError(Exception):
    """Base of every error dnsdisco raises on purpose."""


class ConfigError(DnsdiscoError):
    """A configuration source is invalid; the message names the source and the key."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        parts = []
        if source:
            parts.append(source)
        if key:
            parts.append(f"key {key!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class CatalogError(DnsdiscoError):
    """A catalog operation was refused, with the HTTP status and text Consul uses for it."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class DecodeError(CatalogError):
    """A request body or service/check definition could not be decoded (HTTP 400).

    ``key`` is the dotted path of the offending key when one is to blame (``check.interval``),
    so that a config file error can name it.
    """

    status = 400

    def __init__(self, message: str, status: int | None = None, *, key: str | None = None) -> None:
        super().__init__(message, status)
        self.key = key


class StorageError(CatalogError):
    """The data dir could not durably record a write; the in-memory state is unchanged."""

    status = 500
