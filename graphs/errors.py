"""The error type every dsflow command prints as one clear line, without a traceback.

It lives in graphs/ (the lowest layer) so that config, export and runtime errors all
share it."""


class DsflowError(Exception):
    """A user-facing problem whose message says what is wrong and where."""
