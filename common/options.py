"""Option values as users type them, turned into what dsflow uses, with one clear error
naming the option: dtype spellings (bf16, fp16, fp32, as MindFormers' converters take
them, or the full names) and comma-separated integer lists (--buckets, --devices)."""
from __future__ import annotations

from typing import Optional

from dsflow.common.dtypes import FLOAT_DTYPES
from dsflow.common.errors import OptionError

ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
           **{name: name for name in FLOAT_DTYPES}}


def parse_dtype(text: Optional[str], option: str = "--dtype") -> Optional[str]:
    """`text` as a dsflow dtype name; None stays None (meaning: keep the source's)."""
    if text is None:
        return None
    try:
        return ALIASES[text.lower()]
    except KeyError:
        raise OptionError(f"{option} {text}: unknown dtype (choose from "
                          f"{', '.join(ALIASES)})") from None


def int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    """'512,1024' -> [512, 1024]; None stays None."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{option} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 0:
        raise OptionError(f"{option} {text!r}: expected comma-separated positive integers")
    return values
