"""One-line errors for the command-line entry points (``experiments/*.py``).

:func:`run_main` is ``absl.app.run`` with two changes: a mistake of the user's -- a bad flag or
config override (``--config.nonexistent=1``, ``--config.seed=abc``), a data file that does not
parse, an unknown model, a workdir that is a file or holds another config's run, a checkpoint
that does not fit the config, a missing or corrupt asset -- ends the process with exit code 2
and ONE line on stderr (absl's ``UsageError`` style, ``FATAL: ...``), and ``--verbose`` (or
``MR1_DEBUG=1``) shows the full traceback instead. Anything else is a bug and keeps its
traceback.

Which exceptions are the user's is a registry, :data:`USER_ERRORS` (extend it with
:func:`register_user_error`), not a chain of ``except`` clauses.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

__all__ = ["USER_ERRORS", "EXIT_USER_ERROR", "DEBUG_ENV", "register_user_error", "run_main",
           "one_line", "user_error_line"]

EXIT_USER_ERROR = 2
DEBUG_ENV = "MR1_DEBUG"

flags.DEFINE_bool("verbose", False, "show the full traceback of an error (also MR1_DEBUG=1)")


def _user_error_types() -> list[type[BaseException]]:
    from mr1.assets import AssetNotFoundError
    from mr1.checkpoint import CheckpointNotFoundError
    from mr1.data.paths import DataFileError, DataNotFoundError
    from mr1.models.policy import UnknownModelError
    from mr1.models.weights import WeightLoadError
    from mr1.registry import ConfigError
    from mr1.run_identity import CheckpointMismatchError, RunIdentityError, WorkdirError

    return [app.UsageError, flags.Error, DataFileError, DataNotFoundError, UnknownModelError,
            WeightLoadError, AssetNotFoundError, RunIdentityError, WorkdirError,
            CheckpointMismatchError, CheckpointNotFoundError, ConfigError]


USER_ERRORS: list[type[BaseException]] = []


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    """Adds ``cls`` to the exceptions reported as one line (usable as a class decorator)."""
    if cls not in USER_ERRORS:
        USER_ERRORS.append(cls)
    return cls


def _registry() -> tuple[type[BaseException], ...]:
    if not USER_ERRORS:
        for cls in _user_error_types():
            register_user_error(cls)
    return tuple(USER_ERRORS)


def one_line(message: str, limit: int = 600) -> str:
    """``message`` folded onto one line (whitespace runs become one space), at most ``limit``
    characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_error_line(err: BaseException) -> str:
    """The one line shown for ``err``: its message (a KeyError's without the quotes repr adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"FATAL: {one_line(msg) or type(err).__name__}"


def _debug(argv: list[str] | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    argv = sys.argv if argv is None else argv
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
               for a in argv)


def _fail(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def _override_line(err: BaseException, argv: list[str]) -> str:
    """A config override that failed while the flags were parsed, as one line."""
    name = str(err).strip("'\" ") if isinstance(err, (AttributeError, KeyError)) else ""
    culprit = [a for a in argv if a.startswith("--") and "." in a.split("=")[0]
               and name and name in a.split("=")[0].lstrip("-").split(".")]
    if name and culprit:
        return (f"FATAL: {culprit[0]}: the config has no field {name!r} (the config file "
                "lists its fields)")
    return f"FATAL: bad flag value: {one_line(str(err))}"


def parse_flags(argv: list[str]) -> list[str]:
    """``FLAGS(argv)``; a bad flag or config override exits 2 with one line."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 -- overrides raise AttributeError/TypeError/...
        if _debug(argv):
            raise
        if isinstance(err, flags.Error):
            _fail(f"FATAL Flags parsing error: {one_line(str(err))}")
        _fail(_override_line(err, argv))
    raise AssertionError("unreachable")


def _quiet_logs(argv: list[str]) -> None:
    """absl INFO lines (``JAX process 0/1 ...``) off stderr unless asked for (``-v``,
    ``--verbosity``, ``--verbose``): a failing command prints its one line only."""
    if not _debug(argv) and not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
        logging.set_verbosity(logging.WARNING)


def _one_line_main(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    def wrapped(argv):
        _quiet_logs(sys.argv)
        try:
            return main(argv)
        except _registry() as err:
            if _debug():
                raise
            _fail(user_error_line(err))
    return wrapped


def run_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """``absl.app.run(main)`` with one-line user errors (exit 2) and ``--verbose``."""
    app.run(_one_line_main(main), argv=argv, flags_parser=parse_flags)
