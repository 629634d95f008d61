"""A request's reply settings travel with it: a ``Handle`` call's reply carries its tensors inside
and is at most one chunk, a stream's may carry them beside it and be as large as the server
allows; neither is left in the worker for the requests that follow."""

from __future__ import annotations

import grpc
import pytest
import torch

import fedsecure as sy
from fedsecure.transport import frames
from fedsecure.transport.grpc import METHOD, WorkerServer
from fedsecure.wire import messages as m
from fedsecure.worker.core import WorkerCore

OWNER = "owner-token-0123456789"


def test_a_handle_call_and_a_stream_each_reply_their_own_way() -> None:
    core = WorkerCore("ann")
    with WorkerServer(core, callers={OWNER: ("client", "owner")}) as server, grpc.insecure_channel(
        server.address
    ) as channel:
        settings = core.framed, core.max_reply
        x = torch.randn(frames.CHUNK // 4 + 1000)  # over one chunk
        ptr = x.send(sy.connect("ann", server.address, credentials=OWNER))
        get = m.encode_request(m.Get(ptr.id_at_location))
        reply = channel.unary_unary(METHOD)(get, metadata=(("authorization", f"Bearer {OWNER}"),), timeout=10)
        with pytest.raises(sy.ProtocolError, match="it stays on 'ann'"):
            m.reply_value(reply, worker="ann")
        assert (core.framed, core.max_reply) == settings  # the call's settings were its own
        assert torch.equal(ptr.get(), x)  # the value stayed, and leaves over a stream
