"""Custom models that torch.fx traces into allow-listed operations: sent as graphs, built by workers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fedsecure as sy
from fedsecure import fl
from fedsecure import optim as remote_optim
from fedsecure.data import federate, load_digits
from fedsecure.wire import codec
from fedsecure.worker.graphs import GraphModel
from fedsecure.worker.modules import LAYERS, build, describe, load_state, receive, state_tensors


class ResidualMLP(nn.Module):
    def __init__(self, d: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.skip = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)
        self.scale = nn.Parameter(torch.full((hidden,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + self.skip(h) * self.scale
        return self.head(F.gelu(self.norm(h)))


class SmallCNN(nn.Module):
    """Registers its layers in another order than forward uses them: weights must still fit."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, classes)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.skip = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("offset", torch.linspace(-1, 1, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = x + self.skip(x)
        x = F.max_pool2d(x, 2)
        return self.head(x.flatten(1)) * self.scale + self.offset


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gain = nn.Parameter(torch.rand(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * torch.tanh(self.fc(x))


class Stack(nn.Module):
    """Custom blocks (graphs in a graph) in a ModuleList; ``input`` is renamed by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(6) for _ in range(3)])
        self.out = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 2))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        for block in self.blocks:
            x = block(x)
        return self.out(x.view(x.shape[0], -1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "residual_mlp": (ResidualMLP, (5, 8)),
    "cnn": (SmallCNN, (4, 1, 8, 8)),
    "nested": (Stack, (5, 6)),
    "traced_by_hand": (lambda: fx.symbolic_trace(Stack()), (5, 6)),  # a GraphModule, containers inlined
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    cls, shape = MODELS[name]
    model = cls()
    model.eval()
    return model, torch.randn(shape)


def count_requests(worker: sy.VirtualWorker) -> list[bytes]:
    sent: list[bytes] = []
    transport = worker._transport

    def counting(data: bytes) -> bytes:
        sent.append(data)
        return transport(data)

    worker._transport = counting
    return sent


@pytest.mark.parametrize("name", MODELS)
def test_the_forward_pass_runs_on_the_worker_in_one_message(bob: sy.VirtualWorker, name: str) -> None:
    model, x = make(name)
    expected = model(x)
    assert describe(model)["type"] == "Graph"  # type: ignore[index]
    remote = copy.deepcopy(model).send(bob)
    px = x.send(bob)
    requests = count_requests(bob)
    out = remote(px)
    assert len(requests) == 1
    assert isinstance(out, sy.PointerTensor) and out.shape == expected.shape
    torch.testing.assert_close(out.get(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_a_built_graph_has_the_same_description_tensors_and_outputs(name: str) -> None:
    model, x = make(name)
    spec = describe(model)
    received = codec.decode(codec.encode(spec))  # as a worker receives it
    assert received == spec
    built = build(received)
    assert isinstance(built, GraphModel)  # interpreted: no generated code runs on the worker
    assert describe(built) == spec  # aggregation's "same architecture" check
    assert [n for n, _ in state_tensors(built)] == [n for n, _ in state_tensors(model)]
    load_state(built, [t.detach().clone() for _, t in state_tensors(model)])
    torch.testing.assert_close(built(x), model(x), atol=1e-6, rtol=1e-6)
    received_model, own = receive(received, [t.detach().clone() for _, t in state_tensors(model)])
    assert describe(received_model) == spec and not any(t.is_meta for t in own)
    torch.testing.assert_close(received_model(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: remote_optim.SGD(p, lr=0.1),
    ],
    ids=["torch-sgd", "torch-adam", "fedsecure-sgd"],
)
@pytest.mark.parametrize("name", ["residual_mlp", "cnn"])
def test_training_on_the_worker_matches_local_training(bob: sy.VirtualWorker, name: str, make_opt: Any) -> None:
    model, x = make(name)
    model.train()
    y = torch.randn(model(x).shape)
    local, remote = copy.deepcopy(model), copy.deepcopy(model).send(bob)
    px, py = x.send(bob), y.send(bob)
    for net, inputs, targets in ((local, x, y), (remote, px, py)):
        opt = make_opt(net.parameters())
        for _ in range(3):
            opt.zero_grad()
            loss = ((net(inputs) - targets) ** 2).mean()
            loss.backward()
            opt.step()
    back = remote.get()
    for (n, mine), (_, theirs) in zip(state_tensors(back), state_tensors(local), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5, msg=n)


def test_copy_move_aggregate_and_get(bob: sy.VirtualWorker, alice: sy.VirtualWorker) -> None:
    (one, x), (two, _) = make("cnn", seed=1), make("cnn", seed=2)
    mean = copy.deepcopy(one)
    with torch.no_grad():
        for (_, t), (_, a), (_, b) in zip(state_tensors(mean), state_tensors(one), state_tensors(two), strict=True):
            t.copy_((a + b) / 2 if t.is_floating_point() else torch.maximum(a, b))
    a, b = copy.deepcopy(one).send(bob), copy.deepcopy(two).send(bob)
    twin = a.copy()
    averaged = bob.aggregate([twin, b])
    averaged.move(alice)
    px = x.send(alice)
    requests = count_requests(alice)
    out = averaged(px)
    assert len(requests) == 1
    torch.testing.assert_close(out.get(), mean(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a(x.send(bob)).get(), one(x), atol=1e-6, rtol=1e-6)


def test_frozen_parameters_and_modes_reach_the_worker(bob: sy.VirtualWorker) -> None:
    model, x = make("nested")
    model.blocks[0].gain.requires_grad_(False)
    gain = model.blocks[0].gain.detach().clone()
    remote = copy.deepcopy(model).send(bob)
    assert not remote.blocks[0].gain.requires_grad and remote.blocks[1].gain.requires_grad
    px = torch.cat([x] * 20).send(bob)
    remote.train()
    assert not torch.equal(remote(px).get(), remote(px).get())  # the Sequential's Dropout is on
    remote.eval()
    assert torch.equal(remote(px).get(), remote(px).get())
    opt = torch.optim.SGD(remote.parameters(), lr=0.5)
    remote(px).sum().backward()
    opt.step()
    assert torch.equal(remote.get().blocks[0].gain, gain)


class Recorder(nn.Module):
    """Writes what it sees into its own (frozen) parameter while computing its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.memory = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.memory.copy_(x.mean(0))
        return self.fc(x)


@pytest.mark.parametrize("private", [False, True])
def test_a_graph_that_writes_data_into_its_weights_cannot_release_them(make_worker: Any, private: bool) -> None:
    bob = make_worker("bob", data={"x": torch.randn(8, 2)})
    assert describe(Recorder()) is not None
    remote = Recorder().send(bob)
    x = bob.search("x")[0] if private else torch.randn(8, 2).send(bob)
    remote(x)
    if private:
        with pytest.raises(sy.PermissionDenied):
            remote.get()
    else:
        assert not torch.equal(remote.get().memory, torch.zeros(2))


# -- models that are not described travel as weights only ------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h if h.sum() > 0 else -h  # data-dependent control flow


class ModeReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.5, self.training)  # a trace would bake one mode in


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class OutsideOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(self.fc(x), 1)  # not on the allow-list


class DeviceArgument(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).to(torch.device("cpu"))  # an object outside the plain values


def _double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def _function_argument() -> nn.Module:
    module = fx.symbolic_trace(ResidualMLP())
    assert describe(module) is not None
    node = next(n for n in module.graph.nodes if n.target is torch.relu)
    node.args = (*node.args, _double)  # a graph may hold a function: it is never sent
    return module


def _traced_outside_ops() -> nn.Module:
    return fx.symbolic_trace(OutsideOps())


@pytest.mark.parametrize(
    "make_model", [Branchy, ModeReader, Tied, OutsideOps, DeviceArgument, _function_argument, _traced_outside_ops]
)
def test_models_outside_the_graph_rules_are_not_described(make_model: Callable[[], nn.Module]) -> None:
    model = make_model()
    attributes = set(vars(model))
    assert describe(model) is None
    assert set(vars(model)) == attributes  # tracing left nothing behind


def test_an_untraceable_model_still_runs_op_by_op(bob: sy.VirtualWorker) -> None:
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(4, 3)
    remote = copy.deepcopy(model).send(bob)
    requests = count_requests(bob)
    out = remote(x.send(bob))
    assert len(requests) > 1
    torch.testing.assert_close(out.get(), model(x))


# -- fedsecure.fl trains a custom model -------------------------------------------------------


def test_fl_fit_trains_a_custom_model_on_digits() -> None:
    digits = load_digits()
    fed = sy.Federation()
    policy = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    workers = [
        sy.VirtualWorker(id=f"w{i}", data={"x": x, "y": y, "x_test": x[:20], "y_test": y[:20]},
                         policy=policy, federation=fed)
        for i, (x, y) in enumerate(federate(digits, 3, scheme="dirichlet", alpha=1.0, seed=0))
    ]
    agg = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=fed)
    torch.manual_seed(0)
    model = SmallCNN()
    training = fl.LocalTraining(epochs=2, batch_size=16, lr=0.05, optimizer_args={"momentum": 0.9})
    strategy = fl.FedAvg(training=training, fraction_evaluate=1.0)
    trained, history = fl.fit(model, workers, strategy, rounds=2, aggregator=agg,
                              test_data=(digits.x_test, digits.y_test))
    assert history.last["central_accuracy"] > 0.7
    assert "federated_accuracy" in history.last  # the workers evaluated it too
    trained.eval()
    accuracy = (trained(digits.x_test).argmax(1) == digits.y_test).float().mean()
    assert float(accuracy) == pytest.approx(history.last["central_accuracy"])


def test_a_built_model_keeps_each_submodules_mode() -> None:
    model, _ = make("nested")
    model.train()
    model.blocks[1].eval()
    model.out[0].eval()  # a Sequential in training mode with its Dropout off
    built = build(describe(model))
    assert [m.training for m in built.modules()] == [m.training for m in model.modules()]


def test_a_metadata_pass_that_succeeded_is_not_run_again_and_a_new_shape_is_checked() -> None:
    from fedsecure.errors import ProtocolError
    from fedsecure.worker import dry_run

    runs = []
    real = dry_run._pass

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(1)
        return real(*args, **kwargs)

    dry_run._pass = counted
    try:
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
        x, y = torch.randn(10, 3, 4), torch.zeros(10, dtype=torch.long)
        for _ in range(3):
            dry_run.dry_run(model, x, y, 4, loss, "cross_entropy")
        assert len(runs) == 1
        dry_run.dry_run(model, torch.randn(7, 3, 4), y[:7], 4, loss, "cross_entropy")  # same batch shape
        assert len(runs) == 1
        with pytest.raises(ProtocolError, match="cannot run on data of shape"):
            dry_run.dry_run(model, torch.randn(10, 3, 5), y, 4, loss, "cross_entropy")
        wider = nn.Sequential(nn.Flatten(), nn.Linear(15, 3))  # the same names, another shape
        with pytest.raises(ProtocolError, match="cannot run on data of shape"):
            dry_run.dry_run(wider, x, y, 4, loss, "cross_entropy")
        assert len(runs) == 3
    finally:
        dry_run._pass = real


def test_the_dry_run_leaves_the_model_and_the_random_generator_as_they_were() -> None:
    """It runs a training-mode pass (batch norm updates running statistics, dropout draws) on
    copies: the model's buffers and the process's generator are untouched, and a weight's value
    (here NaN, which would poison any pass through it) plays no part."""
    from fedsecure.worker.dry_run import dry_run

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    dry_run(model, x, y, 4, lambda out, t: nn.functional.cross_entropy(out, t), "cross_entropy-unique-key")
    assert torch.equal(torch.rand(3), expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().all() for k in before)
    assert int(after["1.num_batches_tracked"]) == 0


def _every_layer_kind() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 1), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3, bias=False),
    )


def test_a_built_module_holds_exactly_the_weights_it_was_sent_and_draws_none_of_its_own() -> None:
    sent = _every_layer_kind()
    sent.train()
    sent(torch.randn(5, 2, 6, 6))  # running statistics that differ from their initial values
    sent.eval()
    spec = codec.decode(codec.encode(describe(sent)))  # as a worker receives it
    rng_before = torch.get_rng_state()
    built = build(spec)
    assert torch.equal(torch.get_rng_state(), rng_before), "building drew random initial weights"
    assert not any(p.any() for p in built.parameters()), "zeros until loaded, never memory as allocated"
    load_state(built, [codec.decode(codec.encode(t)) for _, t in state_tensors(sent)])
    for (name, a), (_, b) in zip(state_tensors(sent), state_tensors(built), strict=True):
        assert torch.equal(a, b), name
    built.eval()
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(sent(x), built(x))
    emb = build(describe(nn.Embedding(10, 4, padding_idx=0)))
    weights = [torch.randn(10, 4)]
    load_state(emb, weights)
    assert torch.equal(emb.weight, weights[0])  # the padding row is the sender's, not zeroed here


def test_a_state_that_does_not_fit_installs_nothing() -> None:
    module = build(describe(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))))
    good = [torch.ones(3, 4), torch.ones(3), torch.ones(2, 3), torch.ones(2)]
    load_state(module, good)
    bad = [torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 2), torch.zeros(2)]  # the third is transposed
    with pytest.raises(sy.ProtocolError, match=r"does not fit"):
        load_state(module, bad)
    assert all(torch.equal(t, torch.ones_like(t)) for _, t in state_tensors(module))


def test_a_received_module_holds_the_received_tensors_themselves() -> None:
    sent = _every_layer_kind()
    sent.train()
    sent(torch.randn(5, 2, 6, 6))
    sent.eval()
    sent[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    spec = codec.decode(codec.encode(describe(sent)))
    tensors = [codec.decode(codec.encode(t.detach())) for _, t in state_tensors(sent)]
    rng_before = torch.get_rng_state()
    built, own = receive(spec, tensors)
    assert torch.equal(torch.get_rng_state(), rng_before), "building drew random initial weights"
    assert own == [t for _, t in state_tensors(built)]
    for mine, theirs, (name, original) in zip(own, tensors, state_tensors(sent), strict=True):
        assert mine.data_ptr() == theirs.data_ptr(), f"{name} was copied"
        assert not mine.is_meta and mine.requires_grad == original.requires_grad, name
        assert torch.equal(mine, original), name
    assert describe(built) == describe(sent)
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(sent(x), built(x))
    built.train()
    built(x).sum().backward()  # it trains: its parameters are leaves with gradients
    assert built[0].weight.grad is not None and built[0].bias.grad is None
    for layer in (sent, nn.Embedding(10, 4, padding_idx=0), nn.Conv1d(2, 3, 3)):  # every kind with tensors
        received, _ = receive(describe(layer), [t.detach().clone() for _, t in state_tensors(layer)])
        left = [f"{type(m).__name__}.{k}" for m in received.modules() for k, v in vars(m).items()
                if isinstance(v, torch.Tensor) and v.is_meta]
        assert not left, f"tensors without memory: {left}"
    kinds = {type(m).__name__ for m in sent.modules()} | {"Embedding", "Conv1d"}
    allocating = {k for k, (cls, _) in LAYERS.items() if "device" in cls.__init__.__code__.co_varnames}
    assert allocating and allocating <= kinds, f"layers that make tensors, not checked above: {allocating - kinds}"


def test_a_description_received_again_gives_a_module_that_shares_nothing_with_the_first() -> None:
    """The second time a description arrives its module is copied from the first build's skeleton
    (`modules.on_meta`): nothing done to one module may reach another."""
    sent = _every_layer_kind()
    sent[0].bias.requires_grad_(False)
    spec = describe(sent)
    x = torch.randn(3, 2, 6, 6)

    def received() -> nn.Module:
        return receive(spec, [t.detach().clone() for _, t in state_tensors(sent)])[0]

    first, second = received(), received()
    assert describe(first) == describe(second) == describe(sent)
    sent.eval()
    first.eval()
    second.eval()
    assert torch.equal(first(x), sent(x)) and torch.equal(second(x), sent(x))
    ids = {id(v) for m in first.modules() for v in vars(m).values() if isinstance(v, dict | set | list | torch.Tensor)}
    shared = [f"{type(m).__name__}.{k}" for m in second.modules() for k, v in vars(m).items()
              if isinstance(v, dict | set | list | torch.Tensor) and id(v) in ids]
    assert not shared, f"shared between two received modules: {shared}"
    assert not {id(t) for _, t in state_tensors(first)} & {id(t) for _, t in state_tensors(second)}
    calls: list[int] = []
    first[0].register_forward_hook(lambda *_: calls.append(1))
    first.train()
    with torch.no_grad():
        first[0].weight.add_(1.0)
    third = received()
    assert describe(third) == spec  # modes, frozen parameters: as described, not as `first` is now
    assert third[0].bias.requires_grad is False and third[0].weight.requires_grad is True
    third.eval()
    assert torch.equal(second(x), sent(x)) and torch.equal(third(x), sent(x)) and not calls


def test_a_received_state_that_does_not_fit_is_refused_before_anything_is_built_from_it() -> None:
    spec = describe(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    transposed = [torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 2), torch.zeros(2)]
    for bad, match in ((transposed, "does not fit"), (transposed[:3], "4 tensors, the message 3"),
                       ([torch.zeros(3, 4, dtype=torch.float64), *transposed[1:]], "does not fit")):
        with pytest.raises(sy.ProtocolError, match=match):
            receive(spec, bad)
    placed = describe(nn.Linear(4, 3))
    placed["args"]["device"] = "meta"  # tensors without memory, were it obeyed
    with pytest.raises(sy.ProtocolError, match="does not choose a device"):
        receive(placed, [torch.zeros(3, 4), torch.zeros(3)])


def test_state_tensors_lists_what_torch_lists_in_its_order() -> None:
    """Parameters then buffers, named and ordered as named_parameters() and named_buffers() give
    them: a tensor that two modules share, a submodule used twice, a missing bias, buffers that are
    not saved (running statistics, counters)."""
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4, bias=False)
    tied.weight = shared.weight
    norm = nn.BatchNorm1d(4)
    norm.register_buffer("scratch", torch.zeros(2), persistent=False)
    model = nn.Sequential(shared, nn.ReLU(), tied, nn.Sequential(norm, shared), nn.LayerNorm(4))
    expected = [*model.named_parameters(), *model.named_buffers()]
    got = state_tensors(model)
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))
    assert [n for n, _ in state_tensors(nn.Linear(2, 2))] == ["weight", "bias"]  # a layer on its own: no prefix
