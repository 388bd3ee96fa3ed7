"""Errors of checkpoint reading and export."""
from ..graphs.errors import DsflowError


class CheckpointError(DsflowError):
    """A checkpoint that cannot be read as its config says it should be."""


class ExportError(DsflowError):
    """The export itself cannot proceed (output directory, options)."""
