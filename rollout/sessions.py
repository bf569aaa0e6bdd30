"""Browser sessions for the status page: a login with the admin token yields a random session
id in an HttpOnly, SameSite=Strict cookie, never the token itself.

A browser cannot send a bearer header on navigation, and a token in a URL ends up in history
and logs. So the token is typed once into a form (POST), and the session id stands for it
from then on. The cookie alone never authorizes a change: every cookie-authenticated POST,
PUT or DELETE must also carry the session's CSRF token in a header (the page reads it from
its own HTML, which another origin cannot), and a cross-site request is refused outright
(`Sec-Fetch-Site`, `Origin`).

Only HMAC-SHA256 digests of session ids are kept (keyed by the token), in memory and in a
0600 file in the (private) state dir, so that an open page keeps working when raygate
restarts: it reconnects with the same cookie. A session ends at logout, after `ttl_s`, or
when the token changes.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

log = logging.getLogger("raygate.sessions")

COOKIE = "raygate_session"
CSRF_HEADER = "x-raygate-csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values a browser sends for requests this page may make ("none": typed
# into the address bar or a bookmark).
SAME_SITE = frozenset({"same-origin", "none"})


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float


class Sessions:
    """`key` is the admin token: session ids are kept as HMACs under it, so a rotated token
    ends every session made with the old one (the file alone names no usable session)."""

    def __init__(
        self,
        path: Path | None = None,
        key: bytes | None = None,
        ttl_s: float = 12 * 3600,
        limit: int = 256,
    ) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)
        self.path = path
        self.ttl_s = ttl_s
        self.limit = limit
        self._by_digest: dict[str, Session] = {}
        self._load()

    def create(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: (the id for the cookie, the session). The oldest go past `limit`."""
        now = time.time() if now is None else now
        self._expire(now)
        while len(self._by_digest) >= self.limit:
            oldest = min(self._by_digest, key=lambda d: self._by_digest[d].expires)
            del self._by_digest[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now + self.ttl_s)
        self._by_digest[self._digest(sid)] = session
        self._save()
        return sid, session

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        if not sid:
            return None
        session = self._by_digest.get(self._digest(sid))
        if session is None or session.expires <= (time.time() if now is None else now):
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid and self._by_digest.pop(self._digest(sid), None) is not None:
            self._save()

    def of_request(self, request: Request) -> Session | None:
        return self.get(request.cookies.get(COOKIE))

    def authorizes(self, request: Request, csrf: str | None = None) -> bool:
        """The request's cookie names a live session, and a state-changing request also
        carries its CSRF token (header, or `csrf` read from a form by the caller) and does
        not come from another site."""
        session = self.of_request(request)
        if session is None:
            return False
        if request.method in SAFE_METHODS:
            return True
        if not same_site(request):
            return False
        given = csrf if csrf is not None else request.headers.get(CSRF_HEADER, "")
        return secrets.compare_digest(given.encode("utf-8", "surrogateescape"),
                                      session.csrf.encode())  # fmt: skip

    def _digest(self, sid: str) -> str:
        return hmac.new(self.key, sid.encode("utf-8", "surrogateescape"), "sha256").hexdigest()

    def _expire(self, now: float) -> None:
        for d in [d for d, s in self._by_digest.items() if s.expires <= now]:
            del self._by_digest[d]

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            self._by_digest = {d: Session(str(s["csrf"]), float(s["expires"]))
                               for d, s in raw.items()}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (browsers log in again): %r", self.path, exc)
        self._expire(time.time())

    def _save(self) -> None:
        if self.path is None:
            return
        data = {d: {"csrf": s.csrf, "expires": s.expires} for d, s in self._by_digest.items()}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)


def same_site(request: Request) -> bool:
    """Not a cross-site request, as far as the browser says: `Sec-Fetch-Site` when sent,
    else an `Origin` that names this host. Clients that send neither (curl, scripts) pass:
    they hold the cookie only if someone gave it to them."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in SAME_SITE
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")
