"""The host's checkpoint signing key, /etc/stasis/signing.key: install.sh makes it on
a node and --uninstall keeps it (only --purge removes it), so tests that install
Stasis on this machine remove it afterwards when it was not there before."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

SIGNING_KEY = Path("/etc/stasis/signing.key")


@contextlib.contextmanager
def new_signing_key_removed(keep: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """What of the key, its .pub and their directory the block made is removed after
    it (the directory only if empty), unless ``keep()`` says Stasis stays installed."""
    files = (SIGNING_KEY.parent, SIGNING_KEY, Path(f"{SIGNING_KEY}.pub"))
    made = [p for p in files if not p.exists()]
    try:
        yield
    finally:
        if not keep():
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    if path == SIGNING_KEY.parent:
                        path.rmdir()
                    else:
                        path.unlink()
