"""Who may call and what it costs: [auth], [principals.NAME] and [costs] (read by the router)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from daemons.config.schema import setting

Priority = Literal["interactive", "batch"]
Period = Literal["day", "week", "month"]


@dataclass(frozen=True)
class AuthConfig:
    unix_unlisted: Literal["allow", "key"] = setting(
        "allow", "A caller on the Unix socket is identified by its uid (SO_PEERCRED); no header can change\n"
                 "that. One whose uid and groups no [principals.NAME] lists is, with \"allow\", the principal\n"
                 '"unix:USERNAME" under [principals.default]\'s limits; with "key", it must send an API key\n'
                 "(Authorization: Bearer). root and the router's own user are always admins. Over TCP every\n"
                 "caller needs a key (onebox keys create NAME).")
    secret_file: str = setting(
        "", "The HMAC key API keys are hashed with (32 random bytes, created 0600 at first start);\n"
            "empty means STATE_DIR/keys.secret. Keep it out of backups of keys.db alone.")


@dataclass(frozen=True)
class PrincipalConfig:
    uids: tuple[int, ...] = setting((), "Unix-socket callers with these uids are this principal ...")
    groups: tuple[str, ...] = setting((), "... or in one of these groups (primary or supplementary).")
    admin: bool = setting(False, "May use the admin endpoints (/v1/status, /v1/keys, /v1/usage).")
    priority: Priority = setting(
        "interactive", "Admission class: interactive requests are served before batch ones; within a class,\n"
                       "principals take turns (round robin), so one caller's flood cannot starve the others.")
    local_only: bool = setting(False, "Its requests never go to an upstream provider, whatever a fallback says.")
    budget: float = setting(
        0.0, "Spend allowed per budget_period in [costs] currency (0: no budget). The most a request\n"
             "could cost is reserved when it is admitted and settled when it ends, so concurrent\n"
             "requests can never overspend.", ge=0)
    budget_period: Period = setting("month", "Calendar periods in UTC.")
    requests_per_min: int = setting(0, "Limits (0: none). Over one, the answer is 429 with Retry-After and the limit named.",
                                    ge=0)
    tokens_per_min: int = setting(0, "Prompt + completion tokens (the request's most possible is counted at admission).",
                                  ge=0)
    max_concurrent: int = setting(0, "Requests in flight at once.", ge=0)


@dataclass(frozen=True)
class CostConfig:
    currency: str = setting("USD", "What budgets and the ledger count in.")
    power_watts: float = setting(
        65.0, "Local models are priced per 1k tokens from what the box costs to run: its power draw at\n"
              "load and its price spread over its life, divided by the tokens it serves per hour\n"
              "(scripts/bench/throughput.py measures them). A [models.NAME] price overrides it.", ge=0)
    electricity_per_kwh: float = setting(0.30, "", ge=0)
    hardware_price: float = setting(1500.0, "", ge=0)
    amortisation_years: float = setting(3.0, "", gt=0)
    prompt_tokens_per_s: float = setting(400.0, "The whole box, all users together.", gt=0)
    completion_tokens_per_s: float = setting(100.0, "", gt=0)

    @property
    def per_hour(self) -> float:
        return self.power_watts / 1000 * self.electricity_per_kwh + self.hardware_price / (self.amortisation_years
                                                                                            * 365 * 24)

    def local_prices(self) -> tuple[float, float]:
        """(prompt, completion) price per 1k tokens of a local model."""
        return (self.per_hour / 3600 / self.prompt_tokens_per_s * 1000,
                self.per_hour / 3600 / self.completion_tokens_per_s * 1000)

    def problems(self) -> Iterator[str]:
        if not re.fullmatch(r"[A-Za-z]{3}", self.currency):
            yield "currency: expected a three-letter code such as USD or EUR"
