"""Browser sessions of the dashboard, and the one-time login codes that start them.

A session holds the API token it signed in with (server-side: the browser holds only a random
session id in an ``HttpOnly`` cookie) and a CSRF secret the pages send back on every
state-changing request. Everything lives in memory: a restarted daemon signs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

SESSION_SECONDS = 12 * 3600.0
"""How long a session lasts without a request."""
CODE_SECONDS = 300.0
"""How long a one-time login code may be used (once)."""
MAX_SESSIONS = 1_000
"""Sessions kept at most; the least recently used goes first."""
MAX_CODES = 100
"""Unused login codes kept at most; the oldest goes first."""


@dataclass
class Session:
    """A signed-in browser."""

    id: str
    token: str
    """The API token every call of this session sends (empty when the server has no auth)."""
    role: str
    name: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    expires: float = 0.0
    streams: int = 0
    """Event and log streams open now."""


class Sessions:
    """The dashboard's sessions and login codes."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._codes: dict[str, tuple[float, str, str, str]] = {}

    def start(self, token: str, role: str, name: str) -> Session:
        """A new session for a checked token."""
        now = time.monotonic()
        self._sweep(now)
        while len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions.values(), key=lambda s: s.expires)
            del self._sessions[oldest.id]
        session = Session(secrets.token_urlsafe(32), token, role, name)
        session.expires = now + SESSION_SECONDS
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session of a cookie's id (its life starts again), or None."""
        session = self._sessions.get(session_id)
        now = time.monotonic()
        if session is None or session.expires < now:
            self._sessions.pop(session_id, None)
            return None
        session.expires = now + SESSION_SECONDS
        return session

    def anyone(self) -> Session:
        """The one session of every browser when the API takes no credential (``--no-auth``,
        loopback only): an admin's, with no token."""
        found = self.get("open")
        if found is None:
            found = Session("open", "", "admin", "anyone (authentication is off)")
            found.expires = time.monotonic() + SESSION_SECONDS
            self._sessions[found.id] = found
        return found

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def login_code(self, token: str, role: str, name: str) -> str:
        """A code that starts one session for ``token``, once, within CODE_SECONDS."""
        now = time.monotonic()
        self._sweep(now)
        while len(self._codes) >= MAX_CODES:
            del self._codes[min(self._codes, key=lambda c: self._codes[c][0])]
        code = secrets.token_urlsafe(32)
        self._codes[code] = (now + CODE_SECONDS, token, role, name)
        return code

    def redeem(self, code: str) -> Session | None:
        """The session a login code starts; None for a code unknown, used or expired."""
        now = time.monotonic()
        for known in list(self._codes):
            if hmac.compare_digest(known, code):
                expires, token, role, name = self._codes.pop(known)
                return self.start(token, role, name) if expires >= now else None
        return None

    def _sweep(self, now: float) -> None:
        for sid in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[sid]
        for code in [k for k, c in self._codes.items() if c[0] < now]:
            del self._codes[code]
