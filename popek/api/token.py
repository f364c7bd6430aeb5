"""The API token: the secret a TCP client must show (``Authorization: Bearer TOKEN``).

It lives in an owner-only file, by default in the VMM's state directory. ``popek serve``
creates the file with a fresh random token when there is none, and refuses one that
others could read or write (they could then call the API as its owner); ``popek vm``
and other clients read it from the same file.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

TOKEN_BYTES = 32  # of randomness: 43 characters of URL-safe base64
_TOKEN = re.compile(r"[\x21-\x7e]{16,}")  # printable ASCII, fit for an HTTP header


class TokenError(Exception):
    """No usable token file; the message says why, in one line."""


def load_or_create(path: Path) -> str:
    """The token in ``path``, or a new one written there (mode 0600) if it does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read(path, private=True)
    except OSError as err:
        raise TokenError(f"cannot create the token file {path}: {err.strerror}") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def read(path: Path, *, private: bool = False) -> str:
    """The token in ``path``; ``private``: the file must be the caller's and owner-only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO cannot stall us
    except OSError as err:
        raise TokenError(f"cannot read the token file {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"the token file {path} is not a regular file")
        if private and info.st_uid != os.geteuid():
            raise TokenError(f"the token file {path} belongs to uid {info.st_uid}, not to "
                             f"this user (uid {os.geteuid()})")
        if private and info.st_mode & 0o077:
            raise TokenError(f"the token file {path} is open to others (mode "
                             f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}")
        text = file.read(4096).decode("ascii", "replace").strip()
    if not _TOKEN.fullmatch(text):
        raise TokenError(f"the token file {path} must hold one token of at least 16 "
                         "printable ASCII characters, no spaces")
    return text
