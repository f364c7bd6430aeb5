"""Errors the VMM reports to its clients; each carries the HTTP status that fits it."""

from __future__ import annotations


class VmmError(Exception):
    status = 500


class BadRequest(VmmError):
    """The request cannot be carried out as given (bad field, image, snapshot)."""

    status = 400


class NotFound(VmmError):
    status = 404


class Conflict(VmmError):
    """The VM is not in a state that allows the operation (e.g. resume a running VM)."""

    status = 409


class Forbidden(VmmError):
    """The request names something the VMM's policy keeps from its caller (a host path)."""

    status = 403
