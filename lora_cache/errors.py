"""Errors a user can act on. ComfyUI shows the message as the node's error."""


class LoraCacheError(ValueError):
    """Bad input: the message names the file and the problem."""
