"""The one error type edgesparse raises on bad input.

The CLI turns it into a single line on stderr and a non-zero exit; anything else that escapes is
a bug and keeps its traceback.
"""


class EdgesparseError(Exception):
    """Bad input: a file, argument or package that is not what was expected.

    The message names the thing (a path, an argument, an architecture) and what was expected.
    """


class PackageError(EdgesparseError):
    """A package directory that is missing, incomplete, corrupted or of an unknown version."""
