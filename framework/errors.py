"""Errors the framework raises, each carrying what a user needs to fix the problem.

Config errors are collected and reported together (torchtune's ``_errors.py`` style): a user fixes
every problem in one edit instead of discovering them one start at a time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    """One problem with one key of the composed config."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    """The composed config is not well-formed; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"Config is not well-formed ({n} error{'s' if n != 1 else ''}):"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class RequestError(Exception):
    """A client's mistake: becomes a 4xx JSON answer ``{"error": ..., "detail": ...}``.

    ``field`` names the offending part of the request body so the client knows what to fix.
    """

    def __init__(self, message: str, *, field: str | None = None, status: int = 422):
        self.message = message
        self.field = field
        self.status = status
        super().__init__(message)

    def to_body(self) -> dict:
        body: dict = {"error": self.message}
        if self.field is not None:
            body["detail"] = {"field": self.field}
        return body


class PluginLoadError(Exception):
    """A plugin the config asks for could not be imported or is not a valid plugin."""
