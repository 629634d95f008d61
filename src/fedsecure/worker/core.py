"""The worker's protocol core (sans-I/O): request bytes in, reply bytes out.

`WorkerCore` is a worker's state (`fedsecure.worker.store.WorkerState`: the object store, the
release policy, the quotas) with the protocol on top: decode a request, check who may send it,
run its handler from `HANDLERS`, encode the reply. It owns no socket: `VirtualWorker` calls
`handle` directly, a network server calls it from its servicer, and worker-to-worker moves leave
through the ``send_to_peer`` function it is given.

A new message is a class in `fedsecure.wire.messages`, a handler function
``(state, msg, sender) -> reply value`` in the module of its concern, and one line in `HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsecure.errors import FedsecureError, ProtocolError
from fedsecure.wire import codec
from fedsecure.wire import messages as m
from fedsecure.worker import aggregator, heap, moves, objects, ops, optimizers, rounds, sharing
from fedsecure.worker.store import CLIENT, MAX_REPLY, Sender, WorkerState

Handler = Callable[[WorkerState, Any, Sender], Any]

HANDLERS: dict[type[m.Request], Handler] = {
    # pointer ops on the one guarded path
    m.Call: ops.call,
    m.CallModule: ops.call_module,
    # objects in, out and found
    m.Put: objects.put,
    m.PutModule: objects.put_module,
    m.PutRef: objects.put_ref,
    m.Get: objects.get,
    m.GetModule: objects.get_module,
    m.Count: objects.count,
    m.Search: objects.search,
    m.Owners: objects.owners,
    # optimizers next to their parameters
    m.MakeOptimizer: optimizers.make_optimizer,
    m.OptimizerCall: optimizers.optimizer_call,
    # moves between workers, and what arrives from a peer
    m.Move: moves.move,
    m.MoveModule: moves.move_module,
    m.MoveFold: moves.move_fold,
    m.CopyModule: moves.copy_module,
    m.Deliver: moves.deliver,
    m.DeliverModule: moves.deliver_module,
    # the aggregator's fixed functions
    m.Aggregate: aggregator.aggregate,
    m.AggregateModules: aggregator.aggregate_modules,
    m.FoldModule: aggregator.fold_module,
    m.DeliverFold: aggregator.deliver_fold,
    m.CloseSum: aggregator.close_sum,
    m.AggregateUpdates: aggregator.aggregate_updates,
    m.AggregateShares: aggregator.aggregate_shares,
    # a round's local work
    m.Fit: rounds.fit,
    m.Evaluate: rounds.evaluate,
    # values that leave only hidden
    m.SecAgg: sharing.secagg,
    m.Share: sharing.share,
    m.DeliverShare: sharing.deliver_share,
}
"""message class -> its handler: the worker's whole protocol."""


class WorkerCore(WorkerState):
    """One worker: its objects, its policy, and the protocol that serves them."""

    def handle_local(self, data: bytes, sender: Sender, *, max_reply: int | None = None) -> bytes:
        """Answer a request from a party in this process (`VirtualWorker`s, workers hosted by one
        server). Large tensors travel beside the messages both ways (`codec.Framed`) as views of
        their owner's: the worker gets its own copy of the request's, and the caller its own copy
        of the reply's, made before anything else may change them (one copy each way, where
        packing a tensor into a message and unpacking it took four)."""
        frames = getattr(data, "frames", None)
        if frames is None:
            reply = self.handle(data, sender, framed=True, max_reply=max_reply)
        else:
            # A peer's delivery folded as it arrives reads the sender's tensors during the request
            # and keeps nothing of them: the sender waits for the reply, so they cannot change.
            borrows = sender.kind == "peer" and m.peek_kind(data) in m.BORROWS_FRAMES
            with codec.incoming([codec.borrowed(t) if borrows else codec.own_copy(t) for t in frames]):
                reply = self.handle(bytes(data), sender, framed=True, max_reply=max_reply)
        if type(reply) is codec.Framed:
            reply = codec.Framed(reply, [codec.own_copy(t) for t in reply.frames])
        return reply

    def handle(self, data: bytes, sender: Sender, *, framed: bool | None = None, max_reply: int | None = None) -> bytes:
        """Answer one request. Never raises: every failure becomes an error reply.

        ``framed`` and ``max_reply``: this request's reply settings, where the transport sets them
        per request (a unary call and a stream of one server differ); None: the worker's own."""
        framed = self.framed if framed is None else framed
        token = None if max_reply is None else MAX_REPLY.set(max_reply)
        try:
            msg = m.decode_request(data)
            handler = self._batch if isinstance(msg, m.Batch) else self._dispatch
            value = handler(msg, sender)  # type: ignore[arg-type]
            return m.encode_reply(m.Reply(value), framed=framed)
        except FedsecureError as exc:
            return m.encode_reply(m.error_reply(exc))
        except RecursionError:
            return m.encode_reply(m.error_reply(ProtocolError("the message is nested too deeply")))
        except Exception as exc:  # a bug here must not take the worker down
            return m.encode_reply(m.Reply(None, ("internal", f"{type(exc).__name__}: {exc}", self.id)))
        finally:
            if token is not None:
                MAX_REPLY.reset(token)
            heap.trim_now_and_then()  # what the request freed goes back to the system

    def _dispatch(self, msg: m.Request, sender: Sender) -> Any:
        if (sender.kind == "peer") != msg.PEER_ONLY:
            raise ProtocolError(
                f"{type(msg).__name__} is not accepted from a {sender.kind} ({sender.id!r})"
            )
        # A peer delivers on behalf of the model owner who ordered the move.
        client = getattr(msg, "owner", None) if sender.kind == "peer" else sender.id
        token = CLIENT.set(client)
        try:
            self.objects.release(msg.release, client)
            return HANDLERS[type(msg)](self, msg, sender)
        finally:
            CLIENT.reset(token)

    def _batch(self, batch: m.Batch, sender: Sender) -> Any:
        if sender.kind != "client":
            raise ProtocolError(f"Batch is not accepted from a {sender.kind} ({sender.id!r})")
        self.objects.release(batch.release, sender.id)
        value = None
        last = len(batch.requests) - 1
        for i, data in enumerate(batch.requests):
            msg = m.decode_request(data)
            if isinstance(msg, m.Batch):
                raise ProtocolError("a batch cannot contain a batch")
            try:
                value = self._dispatch(msg, sender)
            except FedsecureError as exc:
                if i < last:  # the sender has moved on: say which earlier op failed
                    what = getattr(msg, "op", type(msg).__name__)
                    exc.args = (f"{what}, sent earlier without waiting for its reply, failed: {exc}",)
                raise
        return value
