"""User-facing errors.

A :class:`TilesegError` is a problem with the user's input (a file, an option, a config) rather than
a bug: the CLI prints it as one line naming the file and the problem and exits with status 2.
"""

from __future__ import annotations

import os

__all__ = ["TilesegError"]


class TilesegError(Exception):
    """A user-facing error about one file or option.

    Parameters
    ----------
    path
        The file (or option/config key) the problem is about; ``None`` when there is none.
    problem
        One line describing what is wrong, without the path.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours has two arguments, needed to cross to Dask workers.
        return (type(self), (self.path, self.problem))
