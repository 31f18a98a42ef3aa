"""Shared helpers for the click front-ends: every user error is one `Error: ...` line and exit status 1.

Three sources of user errors are covered: our own `PidError`s (and `edm_networks` loading errors) raised by
a command (`user_errors`), click's usage errors raised while parsing the options (`OneLineCommand`,
`OneLineGroup`: click would print the usage, a hint and the error, and exit 2), and operating-system errors
about a file the user named (disk full, read-only folder), which name the path.
"""

import contextlib
import functools
import os
from typing import Iterator, Optional, Sequence

import click

from pid.errors import ConfigError, PidError

__all__ = ["user_errors", "OneLineCommand", "OneLineGroup", "EXIT_INTERRUPTED", "check_output_file",
           "check_output_dir"]

# Exit status of a run stopped by SIGINT/SIGTERM after saving its state (128 + SIGINT, as shells report ^C).
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def _usage_errors_in_one_line(ctx: Optional[click.Context]) -> Iterator[None]:
    # click's UsageError prints usage + hint + message and exits 2; the README promises one line and exit 1.
    try:
        yield
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else (ctx.command_path if ctx else "")
        message = " ".join(exc.format_message().split())
        raise click.ClickException(f"{message} (see '{where} --help')" if where else message) from None


class OneLineCommand(click.Command):
    """A click command whose option-parsing errors are one `Error:` line with exit status 1."""

    def parse_args(self, ctx: click.Context, args: list) -> list:
        with _usage_errors_in_one_line(ctx):
            return super().parse_args(ctx, args)


class OneLineGroup(click.Group):
    """A click group (and its subcommands) whose usage errors are one `Error:` line with exit status 1."""

    command_class = OneLineCommand

    def parse_args(self, ctx: click.Context, args: list) -> list:
        with _usage_errors_in_one_line(ctx):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list):
        with _usage_errors_in_one_line(ctx):
            return super().resolve_command(ctx, args)


def _os_error_line(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    what = f"cannot access {exc.filename}" if exc.filename else "a file could not be read or written"
    return (f"{what}: {reason}. Check that the path exists and is writable, and that the disk has free "
            f"space")


def user_errors(fn):
    """Decorator for click commands: print a `PidError`, an `edm_networks` loading error or an OSError about a
    named file as one line, exit 1. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PidError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None
        except OSError as exc:
            if exc.filename is None and exc.strerror is None:
                raise
            raise click.ClickException(_os_error_line(exc)) from None
        except Exception as exc:  # edm_networks errors: imported lazily so pid.cli stays light
            from edm_networks import NetworkPickleError
            if isinstance(exc, NetworkPickleError):
                raise click.ClickException(" ".join(str(exc).split())) from None
            raise

    return wrapper


def check_output_dir(path: str, option: str) -> None:
    """Fail now, not after hours of work, when `path` cannot become a writable directory.

    Creates the directory (as the writer would) and probes it with a temporary file. Raises ConfigError.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option}={path} is an existing file, not a directory; give a directory path.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".pid-write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"{option}={path}: cannot write there ({exc.strerror or exc}); give a writable "
                          f"directory.") from None


def check_output_file(path: str, option: str, extensions: Sequence[str]) -> None:
    """Fail now when `path` cannot be written as a file with one of `extensions` (e.g. ('.png',)).

    Checks the extension, that `path` is not a directory, and that its folder is writable (without leaving
    a file behind). Raises ConfigError.
    """
    if os.path.isdir(path):
        raise ConfigError(f"{option}={path} is a directory; give a file name such as "
                          f"{os.path.join(path, 'out' + extensions[0])}.")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ConfigError(f"{option}={path}: the file name must end in {' or '.join(extensions)} "
                          f"(e.g. {os.path.splitext(path)[0] or 'out'}{extensions[0]}).")
    folder = os.path.dirname(os.path.abspath(path))
    check_output_dir(folder, f"{option} (folder of {path})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option}={path} exists and is not writable; remove it or choose another name.")
