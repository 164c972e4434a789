"""Pick a KV transport: NIXL when it is installed and starts, ZeroMQ TCP otherwise."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from duet.transfer.transport import KVTransport

if TYPE_CHECKING:
    from duet.transfer.curve import ZmqKeys

logger = logging.getLogger(__name__)

TransportKind = Literal["nixl", "zmq", "auto"]


def nixl_importable() -> bool:
    try:
        import duet.transfer.nixl_transport  # noqa: F401
    except ImportError:
        return False
    return True


def make_transport(kind: TransportKind = "auto", name: str = "duet", *, host: str = "127.0.0.1",
                   advertise_host: str | None = None, keys: ZmqKeys | None = None, **kwargs) -> KVTransport:
    """A new transport named ``name`` + a random suffix.

    ``kind``: ``nixl`` (fails if NIXL is missing), ``zmq``, or ``auto`` (NIXL if importable and its agent
    starts, else ZMQ). ``host`` is where the ZMQ backend binds and ``advertise_host`` what its metadata tells
    peers to dial (default: ``host``); NIXL/UCX picks its own interfaces (``UCX_NET_DEVICES``) and puts them in
    its metadata. ``keys`` turns on CURVE for the ZMQ backend (NIXL's UCX data path is not covered by them);
    other keyword arguments go to the backend's constructor.
    """
    if kind not in ("nixl", "zmq", "auto"):
        raise ValueError(f"transport kind must be nixl, zmq or auto, got {kind!r}")
    if kind in ("nixl", "auto") and (kind == "nixl" or nixl_importable()):
        from duet.transfer.nixl_transport import NixlTransport

        try:
            transport = NixlTransport(name, **kwargs)
            if keys is not None:
                logger.warning("CURVE keys protect the control plane but not NIXL/UCX KV transfers")
            return transport
        except Exception as exc:  # noqa: BLE001 - no UCX plugin, no usable device...
            if kind == "nixl":
                raise
            logger.warning("NIXL is installed but its agent failed to start (%s); using ZMQ", exc)
    from duet.transfer.zmq_transport import ZmqTransport

    return ZmqTransport(name, host=host, advertise_host=advertise_host, keys=keys, **kwargs)
