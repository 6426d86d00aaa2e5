"""What every route shares — the config, the broker, identity, limits, the ledger, the
fair queues, the providers, the metrics — and the per-request context (who is calling,
until when) that every route that does work takes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from daemons import registry
from daemons.bus.broker import Broker
from daemons.config import Config, ProviderConfig
from daemons.ledger import KeyStore, Ledger, load_secret, open_keys
from daemons.ledger.files import key_paths, ledger_path
from daemons.router.errors import APIError
from daemons.router.identity import Identity, Principal
from daemons.router.index import Index
from daemons.router.limits import Limits, period_bounds
from daemons.router.metrics import Metrics
from daemons.router.peer import scope_peer
from daemons.router.upstream import Provider, ProviderSpec
from daemons.store import Database

if TYPE_CHECKING:
    from daemons.router.dispatch import Dispatcher
    from daemons.router.meter import Meter

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """A provider's key file that is named or expected but cannot be read."""


def provider(name: str, pc: ProviderConfig, on_state: Callable[[str, str], None]) -> Provider:
    path = pc.key_path(name)
    key: str | None = None
    if path is not None:
        try:
            key = path.read_text().strip() or None
        except OSError as exc:
            raise CredentialError(f"providers.{name}: cannot read its API key from {path}: {exc.strerror}") from None
        if key is None:
            raise CredentialError(f"providers.{name}: the key file {path} is empty")
    spec = ProviderSpec(name=name, kind=pc.kind, base_url=pc.base_url.rstrip("/"), api_key=key,
                        timeout_s=pc.timeout_s, connect_timeout_s=pc.connect_timeout_s, retries=pc.retries,
                        breaker_failures=pc.breaker_failures, breaker_reset_s=pc.breaker_reset_s,
                        max_connections=pc.max_connections)
    log.info("provider %s: %s at %s, %s", name, pc.kind, spec.base_url,
             f"key from {path}" if key else "no API key")
    return Provider(spec, on_state=on_state)


@dataclass
class RouterState:
    config: Config
    broker: Broker
    index: Index
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    providers: dict[str, Provider] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # No I/O here (open() does it): the app and its state can be built in a test.
        from daemons.router.dispatch import Dispatcher

        self.started_at = time.time()
        self.metrics = Metrics(self.registry)
        self.ledger = Ledger(ledger_path(self.config))
        self.limits = Limits(self._spent_since, self.config.router.retry_after_s)
        self.dispatch: Dispatcher = Dispatcher(self)
        self.meters: set[Meter] = set()  # calls not yet in the ledger
        self._spent: dict[float, dict[str, float]] = {}
        self._keys_db: Database | None = None
        self._identity: Identity | None = None
        self.metrics.watch_workers(self.broker.snapshot, self.expected_services)

    def open(self) -> None:
        """Open the databases and providers (raises StoreError, OSError, UpstreamConfigError)."""
        keys_path, secret_path = key_paths(self.config)
        self._keys_db = open_keys(keys_path)
        self._identity = Identity(self.config, KeyStore(self._keys_db, load_secret(secret_path)))
        self.ledger.open()
        # What each principal has spent in its current budget period, read once here (a
        # scan of the period) rather than on the event loop at its first request.
        periods = {p.budget_period for p in [*self.config.principals.values(), self.config.principal("")]
                   if p.budget > 0}
        now = time.time()
        for period in periods:
            start = period_bounds(period, now)[0]
            self._spent[start] = self.ledger.spend_by_principal(start)
        for name, pc in self.config.providers.items():
            self.providers[name] = provider(name, pc, self.metrics.circuit_state)
            self.metrics.circuit_state(name, "closed")

    async def close(self) -> None:
        # Calls the stop cut short (their tasks cancelled, not yet unwound) still get
        # their ledger row before the ledger closes.
        for meter in list(self.meters):
            meter.finish(499, error="the router stopped before the call ended")
        for provider in self.providers.values():
            await provider.aclose()
        self.ledger.close()
        if self._keys_db is not None:
            self._keys_db.close()

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise RuntimeError("RouterState.open() was not called")
        return self._identity

    @property
    def keys(self) -> KeyStore:
        return self.identity.keys

    def _spent_since(self, principal: str, since: float) -> float:
        # A period that began after open() has no spend before it that matters.
        return self._spent.get(since, {}).get(principal, 0.0)

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.router.retry_after_s)}

    def expected_services(self) -> list[str]:
        return registry.expected_services(self.config)


def state_of(request: Request) -> RouterState:
    state: RouterState = request.app.state.onebox
    return state


# The dependencies are coroutines on purpose: FastAPI runs a plain `def` dependency in a
# worker thread, a round trip through the thread pool on every request.
async def get_state(request: Request) -> RouterState:
    return state_of(request)


@dataclass(frozen=True)
class Caller:
    """Who is calling (their principal: name, limits, admin) and until when."""

    principal: Principal
    deadline: float  # unix time


def deadline_for(request: Request, state: RouterState) -> float:
    rc = state.config.router
    timeout = rc.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            timeout = float(header)
        except ValueError:
            raise APIError(400, "X-Request-Timeout must be a number of seconds", "invalid_header") from None
        if not 0 < timeout <= rc.max_request_timeout_s:
            raise APIError(400, f"X-Request-Timeout must be in (0, {rc.max_request_timeout_s:g}]", "invalid_header")
    return time.time() + timeout


async def caller(request: Request) -> Caller:
    """The dependency every API route takes (the app adds it to each area's routes):
    identity first (401), then the deadline."""
    state = state_of(request)
    principal = state.identity.identify(scope_peer(request.scope), request.headers.get("authorization"))
    request.state.principal = principal
    return Caller(principal, deadline_for(request, state))


async def admin(who: Annotated[Caller, Depends(caller)]) -> Caller:
    """The dependency of the admin endpoints: 403 for a principal that is not an admin."""
    if not who.principal.admin:
        raise APIError(403, f"principal {who.principal.name!r} is not an admin (admin = true in its "
                            "[principals.NAME], or call over the Unix socket as root)", "permission_denied")
    return who
