"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class CmeError(Exception):
    """A problem with the user's input or environment; printed as one line, exit code 2."""


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command-line entry point so that CmeError prints one line and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CmeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
