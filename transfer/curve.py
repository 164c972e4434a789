"""CURVE authentication and encryption for every ZeroMQ socket in a Duet cluster.

The model. A deployment has one *server* keypair and one *client* keypair (plus, optionally, more client
public keys), all in one key directory that every process of the cluster can read (``make_keys`` or
``python -m engine.tools.keys DIR`` writes it)::

    DIR/server.key          server public key   (pyzmq certificate format, ``zmq.auth.create_certificates``)
    DIR/server.key_secret   server secret key   (mode 0600)
    DIR/client.key          client public key
    DIR/client.key_secret   client secret key   (mode 0600)
    DIR/authorized_clients/*.key   the client public keys bound sockets accept (client.key is copied here)

- Every *bound* socket is a CURVE server (``secure_server``): a server's command ROUTER and event PUB,
  the router's registry ROUTER, the ZMQ KV transport's data ROUTER.
- Every *connecting* socket is a CURVE client (``secure_client``): DEALERs to command sockets, SUBs to
  event sockets, the transport's DEALERs, the launcher's DEALER.
- Every ``zmq.Context`` with bound sockets runs one ZAP authenticator (``start_authenticator`` for a
  sync context: a thread; ``start_async_authenticator`` for a ``zmq.asyncio`` context: a task on the
  loop); it accepts a client only if its public key is in ``authorized_clients``. Callers on the same
  context share it: each gets a handle and ``stop()``s it on close.

So a peer without the keys (plaintext, or a keypair of its own) can neither command a server, nor read
its events, nor write KV into it: its handshake fails and the bound socket never sees a message. Every
byte on an accepted connection is encrypted and authenticated (CurveZMQ: Curve25519 + XSalsa20-Poly1305).

libzmq lets a CURVE server accept *any* client when no ZAP handler runs on its context, which would
make a forgotten authenticator fail open. ``secure_server`` therefore sets a ZAP domain and
``ZAP_ENFORCE_DOMAIN``: without a running authenticator every client is refused (fail closed).

Every helper takes ``keys: ZmqKeys | None``; ``None`` means plaintext (a no-op), so call sites call them
unconditionally. What CURVE does not cover: the HTTP front end (API keys) and NIXL/UCX data paths.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import stat
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SERVER_CERT = "server"
CLIENT_CERT = "client"
AUTHORIZED_DIR = "authorized_clients"
ZAP_DOMAIN = "duet"  # any non-empty domain: it is what makes ZAP_ENFORCE_DOMAIN apply


@dataclass(frozen=True)
class ZmqKeys:
    """The deployment's CURVE keys, z85-encoded (40 bytes each); secrets never appear in ``repr``."""

    server_public: bytes
    """Public key of every bound socket; clients need it to connect."""
    server_secret: bytes = field(repr=False)
    """Secret key of every bound socket."""
    client_public: bytes
    """Public key this process presents when it connects."""
    client_secret: bytes = field(repr=False)
    authorized_clients: frozenset[bytes]
    """Client public keys that bound sockets accept (the ZAP allow-list)."""

    def __post_init__(self) -> None:
        for name in ("server_public", "server_secret", "client_public", "client_secret"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 40:
                raise ValueError(f"{name} must be a 40-byte z85 CURVE key")
        if not self.authorized_clients:
            raise ValueError("no authorized client keys: every connection would be refused")
        if any(not isinstance(k, bytes) or len(k) != 40 for k in self.authorized_clients):
            raise ValueError("authorized client keys must be 40-byte z85 CURVE public keys")

    @classmethod
    def load(cls, keys_dir: str | os.PathLike) -> ZmqKeys:
        """Read the key directory written by :func:`make_keys`.

        Raises FileNotFoundError naming the missing file, PermissionError when a secret key file is
        readable by group or others (like ssh: a leaked secret key lets anyone into the cluster), and
        ValueError for a malformed certificate.
        """
        root = pathlib.Path(keys_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"CURVE key directory {root} does not exist (make it with "
                                    f"`python -m engine.tools.keys {root}`)")
        server_public, server_secret = _load_pair(root, SERVER_CERT)
        client_public, client_secret = _load_pair(root, CLIENT_CERT)
        authorized_dir = root / AUTHORIZED_DIR
        if not authorized_dir.is_dir():
            raise FileNotFoundError(f"{authorized_dir} is missing: it holds the authorized client public keys")
        authorized = frozenset(zmq.auth.load_certificates(authorized_dir))
        if not authorized:
            raise ValueError(f"{authorized_dir} holds no *.key files: every connection would be refused")
        if client_public not in authorized:
            logger.warning("this process's client key %s is not in %s: other Duet processes will refuse it",
                           _short(client_public), authorized_dir)
        return cls(server_public, server_secret, client_public, client_secret, authorized)


def load_keys(keys_dir: str | os.PathLike | None) -> ZmqKeys | None:
    """``ZmqKeys.load(keys_dir)``, or None (plaintext) when no directory is configured."""
    return None if keys_dir is None or str(keys_dir) == "" else ZmqKeys.load(keys_dir)


def make_keys(keys_dir: str | os.PathLike, *, force: bool = False) -> list[pathlib.Path]:
    """Write a fresh server and client keypair (and authorize the client); returns the files written.

    Secret files are 0600 from the moment they have their final name (written in a private temporary
    directory, then moved). Raises FileExistsError when keys are already there, unless ``force``.
    """
    root = pathlib.Path(keys_dir)
    root.mkdir(parents=True, exist_ok=True)
    authorized_dir = root / AUTHORIZED_DIR
    targets = [root / f"{name}{suffix}" for name in (SERVER_CERT, CLIENT_CERT) for suffix in (".key", ".key_secret")]
    targets.append(authorized_dir / f"{CLIENT_CERT}.key")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"CURVE keys already exist ({', '.join(existing)}); refusing to overwrite them")
    authorized_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".keys-") as tmp:  # mode 0700
        for name in (SERVER_CERT, CLIENT_CERT):
            public_file, secret_file = zmq.auth.create_certificates(tmp, name)
            os.chmod(secret_file, 0o600)
            os.chmod(public_file, 0o644)
        shutil.copy2(os.path.join(tmp, f"{CLIENT_CERT}.key"), os.path.join(tmp, "authorized.key"))
        sources = [os.path.join(tmp, p.name) for p in targets[:4]] + [os.path.join(tmp, "authorized.key")]
        for source, target in zip(sources, targets):
            os.replace(source, target)
    return targets


# ---- sockets

def secure_server(sock: zmq.Socket, keys: ZmqKeys | None) -> None:
    """Make a socket that will *bind* a CURVE server. Call after ``ctx.socket()``, before ``bind()``.

    Its context needs a running authenticator, or every client is refused (see the module docstring).
    """
    if keys is None:
        return
    _check_unattached(sock)
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket, keys: ZmqKeys | None) -> None:
    """Make a socket that will *connect* a CURVE client. Call after ``ctx.socket()``, before ``connect()``."""
    if keys is None:
        return
    _check_unattached(sock)
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


def _check_unattached(sock: zmq.Socket) -> None:
    # CURVE options only apply to connections made after they are set; a late call would leave
    # an earlier endpoint in plaintext without any error from libzmq.
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise ValueError("set CURVE options before bind()/connect(): this socket already has an endpoint")


# ---- authentication (ZAP)

class _AllowList:
    """ZAP credentials provider: accepts exactly the authorized client public keys."""

    def __init__(self, authorized: frozenset[bytes]):
        self.authorized = authorized

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in self.authorized
        if not allowed:
            logger.warning("refused a ZMQ client with unauthorized CURVE key %s (domain %r)",
                           _short(client_key), domain)
        return allowed


def _configure(auth, keys: ZmqKeys) -> None:
    # The provider is looked up by the exact ZAP domain ("*" only stands for an empty one).
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList(keys.authorized_clients))


@dataclass(eq=False)
class _Running:
    auth: ThreadAuthenticator | AsyncioAuthenticator
    keys: ZmqKeys
    loop: asyncio.AbstractEventLoop | None  # the loop an AsyncioAuthenticator's task runs on
    num_users: int = 0


# libzmq allows one ZAP handler per context, so every caller on a context shares one authenticator.
_running: weakref.WeakKeyDictionary[zmq.Context, _Running] = weakref.WeakKeyDictionary()
_running_lock = threading.Lock()


class Authenticator:
    """A caller's share of the one ZAP authenticator running on a context.

    ``stop()`` releases this share (idempotent); the authenticator stops with its last share, after
    which the context's CURVE server sockets refuse every client. Stop before ``ctx.term()``.
    """

    def __init__(self, ctx: zmq.Context, running: _Running):
        self._ctx, self._running = ctx, running

    @property
    def running(self) -> bool:
        return self._running is not None

    def stop(self) -> None:
        with _running_lock:
            running, self._running = self._running, None
            if running is None:
                return
            running.num_users -= 1
            if running.num_users:
                return
            if _running.get(self._ctx) is running:
                del _running[self._ctx]
        running.auth.stop()


def start_authenticator(ctx: zmq.Context, keys: ZmqKeys | None) -> Authenticator | None:
    """Start (or share) ZAP for a synchronous context; None without keys.

    The authenticator is a thread, so handshakes are served even while the caller computes. Call it
    before binding the context's CURVE server sockets, and ``.stop()`` the handle on close. A second
    call on the same context with the same keys shares the running one; other keys: RuntimeError.
    """
    if keys is None:
        return None
    if isinstance(ctx, zmq.asyncio.Context):
        raise TypeError("an asyncio context needs start_async_authenticator()")
    return _acquire(ctx, keys, None, lambda: ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth")))


def start_async_authenticator(ctx: zmq.asyncio.Context, keys: ZmqKeys | None) -> Authenticator | None:
    """Start (or share) ZAP for an asyncio context: a task on the running loop; None without keys.

    Call it from inside the running event loop (e.g. the router's ``async start()``), before binding.
    The loop serves the handshakes, so a blocked loop delays new connections. Sharing as for
    :func:`start_authenticator`, within one event loop; ``stop()`` it on that loop, before it closes.
    """
    if keys is None:
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("start_async_authenticator() must be called inside a running event loop") from None
    return _acquire(ctx, keys, loop, lambda: AsyncioAuthenticator(ctx, log=logging.getLogger("zmq.auth")))


def _acquire(ctx: zmq.Context, keys: ZmqKeys, loop, make) -> Authenticator:
    with _running_lock:
        running = _running.get(ctx)
        if running is not None and running.keys != keys:
            raise RuntimeError("an authenticator with other keys already runs on this zmq context")
        if running is not None and running.loop is not loop:
            raise RuntimeError("an authenticator started in another event loop still runs on this zmq context; "
                               "stop() it first")
        if running is None:
            auth = make()
            _configure(auth, keys)
            try:
                auth.start()
            except zmq.ZMQError as exc:
                auth.stop()  # closes the ZAP socket that failed to bind
                if exc.errno == zmq.EADDRINUSE:
                    raise RuntimeError("another ZAP handler already runs on this zmq context") from None
                raise
            running = _running[ctx] = _Running(auth, keys, loop)
        running.num_users += 1
        return Authenticator(ctx, running)


# ---- files

def _load_pair(root: pathlib.Path, name: str) -> tuple[bytes, bytes]:
    public_file, secret_file = root / f"{name}.key", root / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if not path.is_file():
            raise FileNotFoundError(f"CURVE key file {path} is missing")
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{secret_file} is readable by group or others (mode {mode:o}); "
                              f"run `chmod 600 {secret_file}`")
    public, _ = zmq.auth.load_certificate(public_file)
    secret_public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    if secret_public != public:
        raise ValueError(f"{public_file} and {secret_file} are not the same keypair")
    if zmq.curve_public(secret) != public:
        raise ValueError(f"the secret key in {secret_file} does not match its public key")
    return public, secret


def _short(key: bytes) -> str:
    return key[:8].decode("ascii", "replace") + "..."
