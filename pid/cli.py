"""Shared helpers for the click front-ends: user errors become one line and a non-zero exit."""

import functools

import click

from pid.errors import PidError

__all__ = ["user_errors"]


def user_errors(fn):
    """Decorator for click commands: print a `PidError` (or `edm_networks` loading error) as one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PidError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # edm_networks errors: imported lazily so pid.cli stays light
            from edm_networks import NetworkPickleError
            if isinstance(exc, NetworkPickleError):
                raise click.ClickException(str(exc)) from None
            raise

    return wrapper
