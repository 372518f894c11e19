"""User-facing errors and the `main()` wrapper every command shares.

It lives in `core`, the bottom layer: every other package may import it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (file, field, flag): reported as one line, exit status 2 (a subclass may
    say otherwise, e.g. 1 for an integrity failure)."""

    exit_code = 2


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a command's main, turning UserError into `error: ...` on stderr and its exit status (2)."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
