"""Typed errors: raised where the fault is found, shown as one line by the CLI."""


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose (bad input, bad files)."""


class CheckpointError(EdgeLLMError):
    """A model directory is missing files, holds damaged tensors or does not match its config."""


class UnsupportedModelError(EdgeLLMError):
    """The checkpoint's architecture is not one edgellm implements."""


class InvalidRequestError(EdgeLLMError):
    """A prompt or a sampling parameter is out of range."""
