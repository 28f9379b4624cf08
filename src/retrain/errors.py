"""User-facing errors: each becomes a one-line message and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input a user can fix: params, URLs, archives, images."""

    exit_code = 1


class ParamsError(UserError):
    exit_code = 2


class DataError(UserError):
    """A dataset, archive or image that cannot be used."""


class DownloadError(UserError):
    """A URL that could not be fetched."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error (or its type name when it has no text), cut to `limit`:
    how a library's multi-line message becomes part of a one-line error."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def exits_cleanly(main):
    """Decorate a command's entry point: a UserError prints `error: ...` and exits."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
