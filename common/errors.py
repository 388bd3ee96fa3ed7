"""The error types every dsflow command prints as one clear line, without a traceback.

They live in `dsflow.common`, the lowest layer, so that config, checkpoint, export,
artifact and runtime errors all share one base class and one renderer
(`dsflow.common.cli.run_command`)."""


class DsflowError(Exception):
    """A user-facing problem whose message says what is wrong and where."""


class CheckpointError(DsflowError):
    """A checkpoint that cannot be read as its config says it should be."""


class ExportError(DsflowError):
    """The export itself cannot proceed (output directory, options)."""


class OptionError(DsflowError):
    """A command-line option whose value is invalid in itself (exit status 2, as click
    gives for its own usage errors); the message names the option."""
