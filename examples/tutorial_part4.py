"""PySyft 0.2's tutorial "Part 4: Federated Learning with Model Averaging", on fedsecure.

Two data owners, bob and alice, each hold private data. The model owner (this
script) sends each a copy of the model; each trains it locally for a few steps;
both models then move *directly* to a secure worker, which averages them, so
the model owner receives only the average and never learns who changed what.
Repeat for rounds, then evaluate.

Unlike the original, the workers enforce that promise: the data is private to
its owner (``private=True``), so fetching a single owner's data, gradients or
model raises ``fedsecure.PermissionDenied``; the losses (scalar metrics) and the
average of both owners' models may leave.

With ``--remote`` the three workers are real servers in processes of their own
(``fedsecure worker serve`` on loopback, mutual TLS with certificates made for the
run): bob and alice load their points from their own files, and the model owner
reaches them over gRPC. This tutorial drives the owners' data with pointer ops, so
bob and alice serve it with ``--policy full`` (the pointer API, under the release
rules); by default a served data owner allows only training (``fedsecure.fl``'s
``Fit``/``Evaluate``, moves to trusted aggregators, secure aggregation).

With ``--secure-aggregation`` there is no trusted secure worker at all: bob and alice mask
their models (pairwise masks with dropout recovery, Bonawitz et al. 2017) and the model owner
learns only their average.

Run:  python examples/tutorial_part4.py [--rounds 20] [--local-steps 5] [--seed 0] [--strict] [--remote]
                                        [--secure-aggregation]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn, optim

import fedsecure as sy
from fedsecure.fl.secure import secure_average
from fedsecure.transport.certs import write_federation


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="averaging rounds (default 20)")
    parser.add_argument("--local-steps", type=int, default=5, help="local SGD steps per round")
    parser.add_argument("--lr", type=float, default=0.1, help="local learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="the secure worker releases only its own mean (secure_worker.aggregate)",
    )
    parser.add_argument(
        "--secure-aggregation",
        nargs="?",
        const="pairwise",
        choices=["pairwise", "shares"],
        help="no secure worker, only the average is learnt: bob and alice mask their models (pairwise, "
        "the default) or split them into additive shares that they hold between them (shares)",
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="run the three workers as gRPC servers in processes of their own",
    )
    args = parser.parse_args(argv)
    if args.remote and args.secure_aggregation == "shares":
        # bob and alice would each need the other's address before either starts
        parser.error("--secure-aggregation shares holds the shares on bob and alice, in one process; with --remote "
                     "use pairwise (fl.fit(..., secure_aggregation='shares') runs against servers)")
    torch.manual_seed(args.seed)

    hook = sy.TorchHook(torch)

    # A toy data set: the label is the first input. Each owner gets two of the four
    # points, as its own private data.
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])

    with contextlib.ExitStack() as stack:
        # Step 1: the data owners and the secure worker.
        if args.remote:
            bob, alice, secure_worker = stack.enter_context(_servers(data, target, args.strict))
            (bobs_data,), (bobs_target,) = bob.search("x"), bob.search("y")
            (alices_data,), (alices_target,) = alice.search("x"), alice.search("y")
        else:
            bob = sy.VirtualWorker(hook, id="bob")
            alice = sy.VirtualWorker(hook, id="alice")
            secure_worker = sy.VirtualWorker(
                hook, id="secure_worker", policy=sy.Policy(strict=args.strict)
            )
            bobs_data = data[0:2].send(bob, private=True)
            bobs_target = target[0:2].send(bob, private=True)
            alices_data = data[2:].send(alice, private=True)
            alices_target = target[2:].send(alice, private=True)
        return _train(args, data, target, bob, alice, secure_worker,
                      (bobs_data, bobs_target), (alices_data, alices_target))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _servers(data: torch.Tensor, target: torch.Tensor, strict: bool) -> Any:
    """Three worker servers on loopback with mutual TLS; bob and alice load their points
    from files of their own."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        certs = Path(tmp) / "certs"
        write_federation(certs, ["owner", "bob", "alice", "secure_worker"])
        files = {}
        for name, rows in (("bob", slice(0, 2)), ("alice", slice(2, 4))):
            files[name] = str(Path(tmp) / f"{name}.npz")
            np.savez(files[name], x=data[rows].numpy(), y=target[rows].numpy())
        clients = {"owner": ""}  # the model owner, known by its certificate
        secure = stack.enter_context(
            sy.WorkerProcess(
                "secure_worker", clients=clients, tls_dir=str(certs),
                accept_peers=["bob", "alice"], aggregator=strict,
            )
        )
        owners = [
            stack.enter_context(
                sy.WorkerProcess(
                    name, clients=clients, tls_dir=str(certs), data=files[name],
                    peers={"secure_worker": secure.address}, trust=["secure_worker"],
                    policy="full",  # the tutorial's pointer ops run on the owners' data
                )
            )
            for name in ("bob", "alice")
        ]
        print("workers:", ", ".join(f"{p.id} at {p.address}" for p in (*owners, secure)))
        me = sy.TLS.from_dir(certs, "owner")
        yield tuple(p.connect(me) for p in (*owners, secure))


def _train(
    args: argparse.Namespace,
    data: torch.Tensor,
    target: torch.Tensor,
    bob: sy.WorkerClient,
    alice: sy.WorkerClient,
    secure_worker: sy.WorkerClient,
    bobs: tuple[Any, Any],
    alices: tuple[Any, Any],
) -> float:
    (bobs_data, bobs_target), (alices_data, alices_target) = bobs, alices
    # Step 2: the model, a plain torch module.
    model = nn.Linear(2, 1)

    for round_ in range(1, args.rounds + 1):
        # Step 3: a copy of the current model to each owner.
        bobs_model = model.copy().send(bob)
        alices_model = model.copy().send(alice)
        bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=args.lr)
        alices_opt = optim.SGD(params=alices_model.parameters(), lr=args.lr)

        # Step 4: each owner trains locally; only the scalar losses come back.
        for _ in range(args.local_steps):
            bobs_opt.zero_grad()
            bobs_loss = ((bobs_model(bobs_data) - bobs_target) ** 2).sum()
            bobs_loss.backward()
            bobs_opt.step()
            bobs_loss = bobs_loss.get().data

            alices_opt.zero_grad()
            alices_loss = ((alices_model(alices_data) - alices_target) ** 2).sum()
            alices_loss.backward()
            alices_opt.step()
            alices_loss = alices_loss.get().data

        if args.secure_aggregation:  # Steps 5 and 6 with no trusted party: only the mean is learnt
            if round_ == args.rounds:
                _try_to_read(alices_model)
            if args.secure_aggregation == "shares":
                model.load_state_dict(_shared_average([alices_model, bobs_model], [bob, alice]))
            else:
                model.load_state_dict(secure_average([alices_model, bobs_model], reference=model))
            print(f"round {round_:2d}  Bob: {bobs_loss.item():.4f}  Alice: {alices_loss.item():.4f}")
            continue

        # Step 5: both models go straight to the secure worker; we send only the order.
        alices_model.move(secure_worker)
        bobs_model.move(secure_worker)
        if round_ == args.rounds:
            _try_to_read(alices_model)

        # Step 6: average there and fetch only the average.
        if args.strict:
            average = secure_worker.aggregate([alices_model, bobs_model]).get()
            model.load_state_dict(average.state_dict())
        else:
            with torch.no_grad():
                model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
                model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())

        print(f"round {round_:2d}  Bob: {bobs_loss.item():.4f}  Alice: {alices_loss.item():.4f}")

    # Evaluate the global model (on the training points, as the tutorial does).
    with torch.no_grad():
        preds = model(data)
        loss = ((preds - target) ** 2).sum()
    print("\npredictions:", [round(p, 4) for p in preds.flatten().tolist()])
    print("targets:    ", target.flatten().tolist())
    print(f"final loss:  {loss.item():.4f}")
    return loss.item()


def _shared_average(models: list[nn.Module], holders: list[sy.WorkerClient]) -> dict[str, torch.Tensor]:
    """Each owner splits each of its weights into additive shares held by bob and alice (PySyft's
    ``fix_precision().share(bob, alice)``); each holder sums the shares it holds, and only the sum
    of those sums is put together here. Neither owner sees the other's weights."""
    average = {}
    for name, _ in models[0].named_parameters():
        shared = [getattr(m, name).fix_precision().share(*holders).get() for m in models]
        average[name] = (sy.SharedTensor.sum(shared).get().float_precision() / len(models)).float()
    return average


def _try_to_read(model: nn.Module) -> None:
    """What the model owner may not do: read one owner's model (a strict secure worker then
    uses it in one average only, so this is tried before averaging)."""
    try:
        model.get()
    except sy.PermissionDenied as refusal:
        print(f"\nalices_model.get() was refused ({refusal.rule}), as it should be.\n")


if __name__ == "__main__":
    main()
