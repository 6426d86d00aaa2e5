"""Who is calling: the Unix socket peer's uid (SO_PEERCRED), else an API key.

On the Unix socket the uid decides: a uid or group that a [principals.NAME] lists is that
principal, whatever the request's headers say. root and the router's own user are
admins (they can read every database the router keeps anyway). Another local user is
"unix:USERNAME" with [principals.default]'s limits, or, with [auth] unix_unlisted =
"key", must send a key, like every caller over TCP. A key names its principal
(`onebox keys create NAME`); the principal's limits come from [principals.NAME], else
[principals.default].
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import time
from dataclasses import dataclass, field

from daemons.config import Config, PrincipalConfig
from daemons.ledger.keys import KeyStore
from daemons.router.errors import APIError
from daemons.router.peer import Peer

log = logging.getLogger(__name__)

GROUPS_TTL_S = 60.0  # a user added to a group is seen within a minute


@dataclass(frozen=True)
class Principal:
    name: str
    limits: PrincipalConfig = field(repr=False)
    admin: bool = False
    # How it proved who it is, for logs: "uid 1000", "key 1a2b3c4d".
    via: str = ""

    @property
    def priority(self) -> str:
        return self.limits.priority

    @property
    def local_only(self) -> bool:
        return self.limits.local_only


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="onebox"'})


class Identity:
    def __init__(self, config: Config, keys: KeyStore) -> None:
        self.config = config
        self.keys = keys
        self.own_uid = os.getuid()
        self.by_uid: dict[int, str] = {}
        self.by_group: dict[str, str] = {}
        for name, p in config.principals.items():
            for uid in p.uids:
                self.by_uid.setdefault(uid, name)
            for group in p.groups:
                self.by_group.setdefault(group, name)
        self._groups: dict[int, tuple[float, list[str]]] = {}

    def identify(self, peer: Peer | None, authorization: str | None) -> Principal:
        if peer is not None:
            listed = self._listed(peer)
            if listed is not None:
                return self._principal(listed, f"uid {peer.uid}", admin=peer.uid in (0, self.own_uid))
            if peer.uid in (0, self.own_uid):
                return self._principal("root" if peer.uid == 0 else f"unix:{_user(peer.uid)}", f"uid {peer.uid}",
                                       admin=True)
            if self.config.auth.unix_unlisted == "allow":
                # Whatever it sends: OpenAI clients always send some api_key.
                return self._principal(f"unix:{_user(peer.uid)}", f"uid {peer.uid}")
        return self._by_key(authorization)

    def _by_key(self, authorization: str | None) -> Principal:
        if authorization is None:
            raise unauthorized("this endpoint needs an API key: send Authorization: Bearer KEY "
                               "(onebox keys create NAME makes one)")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("the Authorization header must be Bearer KEY")
        info = self.keys.authenticate(key.strip())
        if info is None:
            raise unauthorized("the API key is not valid (unknown, revoked or mistyped)")
        return self._principal(info.principal, f"key {info.id}")

    def _principal(self, name: str, via: str, admin: bool = False) -> Principal:
        limits = self.config.principal(name)
        return Principal(name, limits, admin or limits.admin, via)

    def _listed(self, peer: Peer) -> str | None:
        name = self.by_uid.get(peer.uid)
        if name is not None or not self.by_group:
            return name
        for group in self._groups_of(peer):
            if group in self.by_group:
                return self.by_group[group]
        return None

    def _groups_of(self, peer: Peer) -> list[str]:
        now = time.monotonic()
        cached = self._groups.get(peer.uid)
        if cached is not None and now - cached[0] < GROUPS_TTL_S:
            return cached[1]
        names: list[str] = []
        try:
            user = pwd.getpwuid(peer.uid)
            gids = os.getgrouplist(user.pw_name, user.pw_gid)
        except KeyError:
            gids = [peer.gid]
        for gid in {*gids, peer.gid}:
            try:
                names.append(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue
        self._groups[peer.uid] = (now, names)
        return names


@functools.lru_cache(maxsize=4096)
def _user(uid: int) -> str:
    """The user's name (cached: under LDAP or sssd each lookup may be a network call)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
