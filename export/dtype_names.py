"""The dtype spellings users type (bf16, fp16, fp32, as MindFormers' converters take
them, or the full names) mapped to the names dsflow uses everywhere else."""
from __future__ import annotations

from typing import Optional

from .dtypes import FLOAT_DTYPES
from .errors import ExportError

ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
           **{name: name for name in FLOAT_DTYPES}}


def parse_dtype(text: Optional[str], option: str = "--dtype") -> Optional[str]:
    """`text` as a dsflow dtype name; None stays None (meaning: keep the source's)."""
    if text is None:
        return None
    try:
        return ALIASES[text.lower()]
    except KeyError:
        raise ExportError(f"{option} {text}: unknown dtype (choose from "
                          f"{', '.join(ALIASES)})") from None
