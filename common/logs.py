"""Keeping MindSpore's own log lines out of the user's terminal unless asked for.

MindSpore reads GLOG_v when it is imported (0 debug, 1 info, 2 warning, 3 error) and
writes through glog to stderr; Python-side warnings go through the 'mindspore' logger.
"""
from __future__ import annotations

import logging
import os
import warnings


def quiet_mindspore(verbose: bool) -> None:
    """Call before mindspore is imported."""
    os.environ.setdefault("GLOG_v", "2" if verbose else "3")
    if not verbose:
        warnings.filterwarnings("ignore", module="mindspore")
        logging.getLogger("mindspore").setLevel(logging.ERROR)
