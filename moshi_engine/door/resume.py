"""Resume tokens: how a visitor whose connection broke takes up the same conversation, in the same
slot with Moshi's state kept, on a new connection (another address, after an outage).

    tokens = ResumeTokens()
    token = tokens.issue(conversation)        # given to the visitor over its connection
    conversation, token = tokens.claim(old)   # on the new connection: ResumeRefused otherwise
    tokens.retire(conversation)               # it ended: its token expires

A token is 144 random bits, bound to one conversation, and good for one claim: each claim
hands out the next one. A conversation is resumable until it ends (`Resumable.refusal` says
why not otherwise), which the grace after an interruption bounds; also while its old connection
still seems to work, since only its client holds the token and a client that comes back on a
new connection has given the old one up. A wrong, used or expired token gets a `ResumeRefused` that says which, and
touches no conversation. This module knows nothing of transports or models.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

# How a claim ended, the `outcome` label of moshi_resumes_total.
RESUMED = "resumed"
UNKNOWN = "unknown"  # never issued: a wrong token
USED = "used"  # issued and claimed already
EXPIRED = "expired"  # its conversation has ended
OUTCOMES = (RESUMED, UNKNOWN, USED, EXPIRED)

REMEMBERED = 4096  # spent tokens kept to tell "used" and "expired" from "unknown"


class Resumable(Protocol):
    def refusal(self) -> str | None:
        """Why this conversation cannot be resumed now (it has ended), else None."""


T = TypeVar("T", bound=Resumable)


class ResumeRefused(Exception):
    """A resume token that takes up no conversation: `outcome` is one of OUTCOMES but RESUMED."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class ResumeTokens(Generic[T]):
    """The resume tokens of one server's live conversations."""

    def __init__(self) -> None:
        self._live: dict[str, T] = {}
        self._token_of: dict[int, str] = {}  # id(conversation) -> its live token
        self._spent: OrderedDict[str, str] = OrderedDict()  # token -> USED or EXPIRED

    def issue(self, conversation: T) -> str:
        """A fresh token for `conversation`; the one it had before is spent."""
        previous = self._token_of.pop(id(conversation), None)
        if previous is not None:
            self._spend(previous, USED)
        token = secrets.token_urlsafe(18)
        self._live[token] = conversation
        self._token_of[id(conversation)] = token
        return token

    def claim(self, token: str) -> tuple[T, str]:
        """The conversation `token` resumes, and the token that resumes it next time; the claimed
        one is spent. ResumeRefused when it resumes nothing (nothing changes then, unless the
        conversation was fine: its token stays good for when its connection breaks)."""
        conversation = self._live.get(token)
        if conversation is None:
            spent = self._spent.get(token)
            if spent == USED:
                raise ResumeRefused(USED, "this resume token was used already")
            if spent == EXPIRED:
                raise ResumeRefused(EXPIRED, "that conversation has ended; start a new one")
            raise ResumeRefused(UNKNOWN, "unknown resume token")
        refusal = conversation.refusal()
        if refusal is not None:
            raise ResumeRefused(EXPIRED, refusal)
        return conversation, self.issue(conversation)

    def retire(self, conversation: T) -> None:
        """`conversation` ended: its token expires."""
        token = self._token_of.pop(id(conversation), None)
        if token is not None:
            self._spend(token, EXPIRED)

    def _spend(self, token: str, why: str) -> None:
        self._live.pop(token, None)
        self._spent[token] = why
        while len(self._spent) > REMEMBERED:
            self._spent.popitem(last=False)

    def __len__(self) -> int:
        return len(self._live)
