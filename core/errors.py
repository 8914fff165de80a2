"""The one base error class of Tuneline, and the one exit-code rule every command follows.

    exit 2  InputError:  the config or the data is wrong; the message says what to fix, nothing ran
    exit 1  StageFailed: a stage or a gate failed on valid input (diverged, below a gate, DVC refused, ...)

Every error Tuneline raises on purpose derives from `TunelineError`, whose message is one line that
says what, where and what to do; anything longer (a gate table) goes in `details`, never in the message,
so that the message can be a Prefect flow run's state message. The CLI prints
`tuneline: <command> failed: <message>`, then the details, and exits with `exit_code`; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class TunelineError(Exception):
    """Base of every error Tuneline raises on purpose."""

    exit_code = 1
    details = ""  # more lines to show after the one-line message (e.g. a gate table); empty: none


class InputError(TunelineError):
    """A params file, an override or the data is invalid (exit 2)."""

    exit_code = 2


class StageFailed(TunelineError):
    """A stage or a gate failed on valid input (exit 1)."""

    exit_code = 1
