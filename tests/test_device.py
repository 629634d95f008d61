"""Where owners train (``[workers] device``, ``VirtualWorker(device=...)``, ``worker serve --device``):
on the CPU exactly as before, "auto" resolving to the CPU on a machine without a GPU, and a clear
error for a device the machine lacks or a name that is none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedsecure as sy
from fedsecure import fl
from fedsecure.data import load_digits, partition
from fedsecure.experiment.config import parse
from fedsecure.experiment.run import run_experiment
from fedsecure.experiment.simulation import Simulation
from fedsecure.worker import device as dev
from fedsecure.worker import training
from fedsecure.worker.device import DeviceError, copy_back, resolve, twin
from fedsecure.worker.remote_model import RemoteModel

NO_GPU = not torch.cuda.is_available()
TOKEN = "device-test-owner-token-0123456789"


def _digits_round(model: nn.Module | None = None, **worker_options: object) -> dict[str, torch.Tensor]:
    """One FedAvg round on three digits owners (``model``, else an MLP); the global model's parameters after it."""
    data = load_digits(seed=0)
    parts = partition(data.y_train, 3, scheme="iid", seed=0)
    federation = sy.Federation()
    trust = sy.Policy(trusted_aggregators=frozenset({"agg"}), private_sends=False)
    owners = [sy.VirtualWorker(id=f"o{i}", data={"x": data.x_train[torch.from_numpy(p)],
                                                  "y": data.y_train[torch.from_numpy(p)]},
                               policy=trust, federation=federation, **worker_options)  # type: ignore[arg-type]
              for i, p in enumerate(parts)]
    aggregator = sy.VirtualWorker(id="agg", policy=sy.Policy(strict=True), federation=federation)
    torch.manual_seed(0)
    if model is None:
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    strategy = fl.FedAvg(training=fl.LocalTraining(epochs=1, batch_size=32, lr=0.1), min_fit_workers=3)
    trained, _ = fl.fit(model, owners, strategy, rounds=1, aggregator=aggregator, seed=0)
    return fl.parameters_of(trained)


def test_cpu_and_auto_train_exactly_as_without_a_device() -> None:
    before = _digits_round()
    for device in ("cpu", "auto"):
        after = _digits_round(device=device)
        assert after.keys() == before.keys()
        for name, t in before.items():
            assert torch.equal(after[name], t), (device, name)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (each one waits for an accelerator)."""

    READS = {torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.item,
             torch.Tensor.tolist, torch.Tensor.numpy}

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("what", ["fit", "evaluate"])
def test_training_and_evaluation_read_values_on_the_host_once_not_every_step(what: str) -> None:
    """No per-step host round trip: the host reads a loss or a count as often for 40 batches as for 2."""
    settings = training.parse(fl.LocalTraining(epochs=1, batch_size=4, lr=0.05).to_wire())
    reads = []
    for n in (8, 160):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
        with _HostReads() as mode:
            if what == "fit":
                training.fit(model, x, y, settings, seed=3)
            else:
                training.evaluate(model, x, y, "cross_entropy", 4)
        reads.append(mode.reads)
    assert reads[0] == reads[1], reads


def test_the_mean_training_loss_is_the_same_sum_as_of_python_floats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    settings = training.parse(fl.LocalTraining(epochs=2, batch_size=7, lr=0.05).to_wire())
    _, mean, steps = training.fit(model, x, y, settings, seed=3)
    generator, opt, total = torch.Generator().manual_seed(3), torch.optim.SGD(reference.parameters(), lr=0.05), 0.0
    for _ in range(2):
        order = torch.randperm(50, generator=generator)
        for start in range(0, 50, 7):
            index = order[start : start + 7]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(reference(x[index]), y[index])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(index)
    assert steps == 16 and mean == total / 100


def _conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


class _ViewNet(nn.Module):
    """A graph model whose ``view`` needs the contiguous layout of the convolution's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_a_conv_model_of_built_in_layers_is_fed_channels_last_batches_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert dev.fast_format(_conv(), cpu) == torch.channels_last
    assert dev.fast_format(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), cpu) == torch.contiguous_format
    assert dev.fast_format(_ViewNet(), cpu) == torch.contiguous_format  # its own forward: layout unknown
    assert dev.fast_format(_conv(), torch.device("cuda", 0)) == torch.contiguous_format
    assert dev.fast_format(_conv().double(), cpu) == torch.contiguous_format  # oneDNN runs no float64
    model, seen = _conv(), []
    model[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].stride(1), out.is_contiguous())))
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    settings = training.parse(fl.LocalTraining(epochs=1, batch_size=16, lr=0.1).to_wire())
    training.fit(model, x, y, settings, seed=0)
    training.evaluate(model, x, y, "cross_entropy", 16)
    # a channel stride of 1, and the convolution answers channels-last: not contiguous
    assert seen == [(1, False)] * 6
    assert all(t.is_contiguous() and t.stride() == dev.dense_strides(t.shape) for t in model.state_dict().values())


def test_owners_train_a_conv_model_channels_last_within_rounding_of_the_contiguous_layout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round of FedAvg on three digits owners (about 480 rows each): channels-last gives the same
    result every time, within rounding of the contiguous layout's (summed in another order), and
    contiguous tensors to the model owner."""
    fast = _digits_round(_conv())
    assert all(torch.equal(t, fast[k]) for k, t in _digits_round(_conv()).items())
    assert all(t.is_contiguous() for t in fast.values())
    monkeypatch.setattr(dev, "fast_format", lambda module, device: torch.contiguous_format)
    plain = _digits_round(_conv())
    assert any(not torch.equal(t, fast[k]) for k, t in plain.items())  # the other layout did run
    for k, t in plain.items():
        assert torch.allclose(fast[k], t, rtol=1e-4, atol=1e-5), k


def test_a_graph_model_whose_view_needs_the_contiguous_layout_trains_on_any_strides_of_the_data() -> None:
    """Digits taken with an index have a channel stride of 1 (free for a size-1 dimension), which
    makes torch's convolution answer channels-last: a worker holds its data with fresh strides, so
    the model's ``view``, accepted by the dry run on fresh zeros, works on the values too (it failed
    on them before)."""
    data = load_digits(seed=0)
    assert data.x_train[torch.arange(10)].stride()[1] == 1  # the strides this test is about
    before = fl.parameters_of(_ViewNet())
    after = _digits_round(_ViewNet())
    assert any(not torch.equal(t, before[k]) for k, t in after.items())


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_auto_is_the_cpu_without_a_gpu() -> None:
    assert resolve("auto") == torch.device("cpu")
    assert sy.VirtualWorker(id="w", federation=sy.Federation(), device="auto").core.device.type == "cpu"


def test_a_twin_trained_elsewhere_writes_back_what_training_in_place_gives() -> None:
    """The accelerator path (train a copy, copy the result back), run with the CPU as its device."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    settings = training.parse(fl.LocalTraining(epochs=2, batch_size=8, lr=0.05,
                                               optimizer_args={"momentum": 0.9}).to_wire())
    in_place = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    in_place.load_state_dict(model.state_dict())
    kept = list(model.parameters()) + list(model.buffers())
    expected = training.fit(in_place, x, y, settings, seed=7)
    work = twin(model, torch.device("cpu"))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(work.parameters(), model.parameters(), strict=True))
    assert training.fit(work, x, y, settings, seed=7) == expected
    copy_back(work, model)
    assert [*model.parameters(), *model.buffers()] == kept  # the stored tensors themselves, written in place
    for name, t in in_place.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r'device = "cpu" \(or "auto"'):
        sy.VirtualWorker(id="w", federation=sy.Federation(), device="cuda")
    exp = parse({"experiment": {"rounds": 1, "output": str(tmp_path / "run")},
                 "data": {"workers": 2}, "workers": {"device": "cuda:0"}}, "gpu.toml")
    with pytest.raises(fl.ConfigurationError, match=r'gpu.toml: \[workers\] device .cuda:0. needs a CUDA GPU.*'
                                                    r'device = "cpu" \(or "auto"'):
        run_experiment(exp, progress=False)
    hosted = parse({"data": {"workers": 2}, "workers": {"mode": "processes", "device": "cuda"}}, "hosts.toml")
    with pytest.raises(fl.ConfigurationError, match=r"hosts.toml: \[workers\] device 'cuda' needs a CUDA GPU"):
        Simulation(hosted)  # refused before any host process starts


def test_an_unknown_device_is_refused_naming_the_choices() -> None:
    with pytest.raises(fl.ConfigurationError, match=r"\[workers\] device must be one of 'auto', 'cpu', 'cuda', "
                                                    r"'cuda:N', 'mps'.*got 'gpu'"):
        parse({"workers": {"device": "gpu"}})
    for bad in ("tpu", "cuda:", "CPU", ""):
        with pytest.raises(DeviceError, match="device must be one of"):
            sy.VirtualWorker(id="w", federation=sy.Federation(), device=bad)


def _two_fits(worker: sy.WorkerClient) -> list[dict[str, object]]:
    """Two rounds of local training of one model on the worker's data; the replies (the mean loss
    of the second depends on every parameter the first wrote)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    remote = RemoteModel.put(worker, fl.parties.sendable(model), list(fl.parameters_of(model).values()))
    config = fl.LocalTraining(epochs=2, batch_size=4, lr=0.1).to_wire()
    return [remote.fit("x", "y", config, seed) for seed in (3, 4)]


def test_a_served_worker_trains_on_the_device_its_flag_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype("float32")
    y = rng.integers(0, 3, size=30)
    np.savez(tmp_path / "bob.npz", x=x, y=y)
    served = sy.WorkerProcess("bob", clients={"owner": TOKEN}, data=str(tmp_path / "bob.npz"),
                              extra=["--device=cpu"]).start()
    try:
        bob = sy.connect("bob", served.address, credentials=TOKEN)
        local = sy.VirtualWorker(id="bob", data={"x": torch.from_numpy(x), "y": torch.from_numpy(y)},
                                 federation=sy.Federation(), device="cpu",
                                 policy=sy.Policy(training_only=True, private_sends=False))
        served_replies = _two_fits(bob)
        assert served_replies == _two_fits(local)
        assert served_replies[1]["loss"] < served_replies[0]["loss"]  # type: ignore[operator]
    finally:
        served.stop()


@pytest.mark.parametrize(("flag", "message"), [
    ("--device=tpu", "--device: device must be one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    pytest.param("--device=cuda", '--device: device \'cuda\' needs a CUDA GPU', marks=pytest.mark.skipif(
        not NO_GPU, reason="this machine has a GPU")),
])
def test_the_served_worker_refuses_a_device_it_cannot_use(flag: str, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fedsecure", "worker", "serve", "--id=bob",
                           f"--client=owner={TOKEN}", flag], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
