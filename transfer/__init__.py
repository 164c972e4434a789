"""Duet's KV transfer layer: moving KV bytes from prefill to decode servers.

- :mod:`transfer.transport`: the ``KVTransport`` interface (register memory, connect peers, one-sided WRITEs
  with notifications that arrive after the data, polled handles) and its shared types.
- :mod:`transfer.nixl_transport`: NIXL / UCX backend (RDMA, NVLink, CUDA IPC, shared memory), no progress thread.
- :mod:`transfer.zmq_transport`: ZeroMQ TCP fallback for hosts without NIXL; also the tests' reference backend.
- :mod:`transfer.factory`: ``make_transport("nixl" | "zmq" | "auto", name)``.
- :mod:`transfer.wire`: typed, versioned msgpack messages for the control plane (never pickle).
- :mod:`transfer.compat`: the KV layout each engine advertises and the compatibility check made before any
  KV moves.

Typical use (decode side D receives, prefill side P writes)::

    d = make_transport("auto", "decode"); region = d.register(kv_slab)      # D
    # D -> P over the control plane: d.name, d.metadata(), d.describe(region)
    p.connect(d_name, d_metadata)                                            # P
    h = p.write(p_region, 0, nbytes, d_region_desc, 0, notif=b"xfer-7:L0")   # P
    p.wait(h, deadline_s=5.0); p.release(h)                                  # P
    d.notifications()  # -> [(p.name, b"xfer-7:L0")] once the bytes are in kv_slab   # D
"""
from duet.transfer.compat import IncompatiblePeer, KVLayout, check_compatible
from duet.transfer.factory import make_transport
from duet.transfer.transport import (
    DONE,
    ERROR,
    PENDING,
    KVTransport,
    PeerNotConnected,
    RegionHandle,
    RemoteRegion,
    TransferError,
    TransferHandle,
    TransferState,
)
from duet.transfer.wire import PROTOCOL_VERSION, Message, ProtocolError, decode, encode

__all__ = [
    "DONE",
    "ERROR",
    "PENDING",
    "PROTOCOL_VERSION",
    "IncompatiblePeer",
    "KVLayout",
    "KVTransport",
    "Message",
    "PeerNotConnected",
    "ProtocolError",
    "RegionHandle",
    "RemoteRegion",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "check_compatible",
    "decode",
    "encode",
    "make_transport",
]
