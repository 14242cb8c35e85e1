"""What a config value that ends up in a file name, a Slurm job or the sbatch script may hold.

`run.name` names the run directory, the Slurm job and the W&B run; `slurm.*` values are pasted into
`#SBATCH` lines. A newline in any of them would end that line and start a shell command (sbatch also
stops reading `#SBATCH` lines at the first command, silently dropping the options after it), so values
are checked here, when the config is loaded, with the key and a value that works in the message.
"""
from __future__ import annotations

import re
import unicodedata

# letters, digits, '_', '-', '.', starting with a letter or a digit: safe as a file name, a Slurm job
# name and a shell word, and never taken for an option or a hidden file
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# a directory name is at most 255 bytes on common filesystems; a study adds "-<variant>" to its run.name
MAX_NAME_CHARS = 128


def control_characters(text: str) -> list[str]:
    """The control characters in `text` (newline, carriage return, tab, escape, ...), as repr()s."""
    return sorted({repr(c) for c in str(text) if unicodedata.category(c) in ("Cc", "Zl", "Zp")})


def check_no_control(key: str, value: object, why: str = "it is written into the sbatch script") -> None:
    bad = control_characters(str(value))
    if bad:
        raise ValueError(f"config key `{key}` is {str(value)!r}: it holds the control character(s) {', '.join(bad)}, "
                         f"which no value may hold ({why}); remove them")


def check_name(key: str, value: str, *, names: str, example: str) -> None:
    """`value` is a NAME_RE name of at most MAX_NAME_CHARS characters; else ValueError naming `key`.
    `names`: what the value names, for the message; `example`: a valid `key=value`."""
    value = str(value)
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"config key `{key}` is {len(value)} characters long ({value[:40]!r}...); at most "
                         f"{MAX_NAME_CHARS} (it names {names}), e.g. {example}")
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"config key `{key}` is {value!r}: use letters, digits, '_', '-' and '.', starting with a "
                         f"letter or digit (it names {names}), e.g. {example}")
