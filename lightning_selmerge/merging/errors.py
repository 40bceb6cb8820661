"""The one error type of the merge core."""


class MergeError(ValueError):
    """Bad merge input: the message names the tensor or replica at fault and how to fix it."""
