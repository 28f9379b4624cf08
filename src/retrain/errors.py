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
