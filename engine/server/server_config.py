"""How one prefill, decode or colocated server runs (its engine is configured by ``engine.config.EngineConfig``)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from duet.engine import envs
from duet.engine.protocol import SERVER_ROLES, Role
from duet.engine.server.advertised_address import AdvertisedAddress
from duet.transfer.curve import ZmqKeys, load_keys
from duet.transfer.handoff import HandoffFaults

KV_FAILURE_POLICIES = ("recompute", "fail")
EXECUTORS = ("native", "vllm")
KV_TRANSPORTS = ("auto", "nixl", "zmq")
_UCX_LIST = re.compile(r"^\^?[A-Za-z0-9_:.\-]+(,[A-Za-z0-9_:.\-]+)*$")  # UCX_TLS / UCX_NET_DEVICES syntax


def _faults_from_env() -> HandoffFaults:
    return HandoffFaults(fail_write_p=envs.fault_fail_write_p(), drop_notif_p=envs.fault_drop_notif_p())


@dataclass
class ServerConfig:
    """Everything about a server that is not its engine. Invalid values raise ``ValueError`` naming the field."""

    role: Role
    """``prefill`` (prefills for decode servers), ``decode`` (generates; prompt KV from prefill servers or its
    own prefill) or ``both`` (colocated: does both for its own requests)."""
    host: str = "127.0.0.1"
    """Interface the command, event and ZeroMQ KV sockets bind to (``0.0.0.0``: every interface)."""
    advertise_host: str | None = None
    """What the router and peers are told to connect to (every advertised endpoint: command, events, ZeroMQ KV);
    None: ``host`` itself, or this host's primary address when ``host`` is a wildcard. See
    ``engine.server.advertised_address``."""
    allow_loopback_advertise: bool = False
    """Allow advertising a loopback address while bound to a non-loopback one (every peer on this host)."""
    port: int = 0
    """Command (ROUTER) port; 0 picks a free one."""
    event_port: int = 0
    """Event (PUB) port; 0 picks a free one."""
    executor: str = "native"
    """``native`` (Duet's engine) or ``vllm`` (a vLLM engine with Duet's KV connector)."""
    kv_transport: str = "auto"
    """``nixl``, ``zmq`` or ``auto`` (NIXL when it is installed and starts)."""
    zone: str | None = None
    """Data-locality zone: the router sends this server only requests of its zone."""
    staging_bytes: int = 64 << 20
    """Registered staging memory for KV slabs (both directions)."""
    kv_timeout_s: float = 30.0
    """Deadline of a KV hand-off, from its admission; past it the decode side applies its failure policy."""
    kv_failure_policy: str = "recompute"
    """When KV does not arrive: ``recompute`` (prefill here) or ``fail`` (the request ends with a 503)."""
    heartbeat_s: float = 0.2
    """Period of load reports (the router's liveness signal) and of re-registration with ``router_address``."""
    router_address: str | None = None
    """Register with this router at run time (its registry socket)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM or ``Drain``: how long in-flight work may take to finish before it is aborted."""
    model_name: str = ""
    """Name in the OpenAI API (default: the model path)."""
    ucx_tls: str | None = None
    """NIXL: UCX transports (``UCX_TLS``, e.g. ``tcp``, ``rc,cuda_copy``); None leaves UCX's choice (or the
    environment's ``UCX_TLS``)."""
    ucx_net_devices: str | None = None
    """NIXL: UCX devices (``UCX_NET_DEVICES``, e.g. ``eth0``, ``mlx5_0:1``); None: every device UCX finds."""
    zmq_keys_dir: str | None = None
    """CURVE key directory: authenticate and encrypt every ZeroMQ socket (None: plaintext)."""
    faults: HandoffFaults = field(default_factory=_faults_from_env)
    """Test-only fault injection in the hand-off (``DUET_FAULT_*``)."""
    debug_layer_delay_s: float = 0.0
    """Test hook: sleep this long after each layer of a step that streams KV out."""
    debug_step_delay_s: float = 0.0
    """Test hook: sleep this long after each engine step."""
    advertised: AdvertisedAddress = field(init=False, repr=False)
    """Derived from ``host`` / ``advertise_host``: where sockets bind, and every endpoint peers are told."""

    def __post_init__(self) -> None:
        try:
            self.role = Role(self.role)
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in SERVER_ROLES]}, got {self.role!r}") from None
        if self.role not in SERVER_ROLES:
            raise ValueError(f"role must be one of {[r.value for r in SERVER_ROLES]}, got {self.role!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.kv_failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv_failure_policy must be one of {KV_FAILURE_POLICIES}, got {self.kv_failure_policy!r}")
        for name in ("port", "event_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("kv_timeout_s", "heartbeat_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.staging_bytes < 1 << 20:
            raise ValueError(f"staging_bytes must be >= 1 MiB, got {self.staging_bytes}")
        for name in ("debug_layer_delay_s", "debug_step_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ucx_tls", "ucx_net_devices"):
            value = getattr(self, name)
            if value is not None and not _UCX_LIST.match(value):
                raise ValueError(f"{name} must be a comma-separated UCX list (e.g. 'tcp', 'mlx5_0:1,eth0'), "
                                 f"got {value!r}")
        # Validated now: a wrong address fails at start-up, not at the first peer that cannot dial it.
        self.advertised = AdvertisedAddress.resolve(self.host, self.advertise_host,
                                                    allow_loopback=self.allow_loopback_advertise)

    @functools.cached_property
    def zmq_keys(self) -> ZmqKeys | None:
        """The loaded CURVE keys (FileNotFoundError / PermissionError / ValueError naming the file)."""
        return load_keys(self.zmq_keys_dir)
