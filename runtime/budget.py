"""How much an untrusted archive may write: a configured maximum and the free space.

A few kilobytes of gzip or a sparse tar member expand to gigabytes. Before
anything of a member is written, :meth:`Budget.take` checks its expanded size
against the configured limit (``[limits]`` in the config) and against the
target filesystem's free space less a reserve, and raises
:class:`~runtime.errors.ResourceExhausted` naming the archive, the size and the
limit; so a refused archive never fills the disk.
"""

from __future__ import annotations

import os

from runtime.errors import ResourceExhausted


class Budget:
    """The bytes ``what`` (an archive, named in errors) may still write under ``directory``.

    ``limit`` is the configured maximum, ``setting`` its config key (for the
    message), ``reserve`` the free space always left on the filesystem.
    """

    def __init__(
        self, directory: str, what: str, *, limit: int, reserve: int, setting: str
    ) -> None:
        self.directory = directory
        self.what = what
        self.limit = limit
        self.reserve = reserve
        self.setting = setting
        self.total = 0

    def take(self, size: int, item: str = "") -> None:
        """Account for ``size`` more bytes (of ``item``) before writing them."""
        self.total += size
        of = f" ({item})" if item else ""
        if self.total > self.limit:
            raise ResourceExhausted(
                f"{self.what} expands to more than {self.limit} bytes (at least "
                f"{self.total}{of}): over the limit {self.setting}"
            )
        if size == 0:
            return
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        if size > free - self.reserve:
            raise ResourceExhausted(
                f"{self.what}: {size} bytes{of} do not fit in {self.directory}: "
                f"{free} bytes free, {self.reserve} kept in reserve (limits.reserve_bytes)"
            )
