"""The error a builder raises when it cannot make or find a build."""

from __future__ import annotations

from plait.errors import PlaitError

__all__ = ["BuildError"]


class BuildError(PlaitError):
    """A build could not be found, made or published; the message says what failed and what to
    do about it (a missing parent image, an unreachable registry, a failing build step ...).

    Nothing is assumed when a check cannot be made: a registry that cannot be asked whether it
    holds an image fails the build rather than letting the builder guess either way.
    """

    reason = "FAILED_PRECONDITION"
