"""PySyft 0.2 tutorial, Part 6 (federated learning on MNIST with a CNN), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 6: a torch data set is split over two
workers with ``.federate((bob, alice))``, a ``FederatedDataLoader`` hands out batches that stay on
their worker, and a small CNN goes to each batch's worker, takes one SGD step there and comes back.
The optimizer is built once, before the loop: ``model.send`` keeps the same parameter objects, so
it steps the remote weights. The test set is evaluated here, with a plain torch ``DataLoader``.

PySyft downloaded MNIST with torchvision. This script reads Fashion-MNIST (the same format: 28x28
grey images, ten classes) from Debian's ``dataset-fashion-mnist`` package through
``fedsecure.data``; where that package is missing it uses scikit-learn's 8x8 digits, enlarged to
28x28 so that the same network runs. The data is sent from this process, so it is the model
owner's own, and the model may come back after each step.

Run: python examples/pysyft/part06_mnist_cnn.py
(640 training images, 1 epoch; FEDSECURE_TUTORIAL_FULL=1 gives the tutorial's sizes: all images,
batches of 64, 10 epochs)
"""

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn, optim

import fedsecure as sy
from fedsecure.data import Dataset, DatasetNotFound, load_digits, load_fashion_mnist

losses: dict[str, list[float]] = {"federated training": []}

FULL = os.environ.get("FEDSECURE_TUTORIAL_FULL") == "1"

hook = sy.TorchHook(torch)
bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")


class Arguments:
    def __init__(self) -> None:
        self.batch_size = 64 if FULL else 32
        self.test_batch_size = 1000
        self.epochs = 10 if FULL else 1
        self.lr = 0.01 if FULL else 0.1  # the short run takes 20 steps, not 9000
        self.momentum = 0.5
        self.no_cuda = False
        self.seed = 1
        self.log_interval = 30 if FULL else 4
        self.save_model = False
        self.train_size = None if FULL else 640
        self.test_size = None if FULL else 320


args = Arguments()

use_cuda = not args.no_cuda and torch.cuda.is_available()
torch.manual_seed(args.seed)
device = torch.device("cuda" if use_cuda else "cpu")
kwargs = {"num_workers": 1, "pin_memory": True} if use_cuda else {}


# -- what torchvision's datasets.MNIST gave the tutorial -------------------------------------------


def load_images() -> Dataset:
    """Fashion-MNIST where installed; otherwise the digits, enlarged from 8x8 to 28x28."""
    try:
        return load_fashion_mnist()
    except DatasetNotFound:
        digits = load_digits()

        def enlarge(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)

        return dataclasses.replace(digits, x_train=enlarge(digits.x_train), x_test=enlarge(digits.x_test))


images = load_images()
print(f"data: {images}")
MEAN, STD = float(images.x_train.mean()), float(images.x_train.std())  # the tutorial's Normalize


class ImageDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs of one split, each image normalised as it is read."""

    def __init__(self, train: bool, size: int | None) -> None:
        x, y = (images.x_train, images.y_train) if train else (images.x_test, images.y_test)
        self.x, self.y = x[:size], y[:size]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x[i] - MEAN) / STD, self.y[i]


# The training set is split between bob and alice: each holds its own half from now on.
federated_train_loader = sy.FederatedDataLoader(
    ImageDataset(train=True, size=args.train_size).federate((bob, alice)),
    batch_size=args.batch_size,
    shuffle=True,
    **kwargs,
)

test_loader = torch.utils.data.DataLoader(
    ImageDataset(train=False, size=args.test_size),
    batch_size=args.test_batch_size,
    shuffle=True,
    **kwargs,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # 28x28 -> 24x24
        x = F.max_pool2d(x, 2, 2)  # -> 12x12
        x = F.relu(self.conv2(x))  # -> 8x8
        x = F.max_pool2d(x, 2, 2)  # -> 4x4
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(args, model, device, federated_train_loader, optimizer, epoch):  # type: ignore[no-untyped-def]
    model.train()
    for batch_idx, (data, target) in enumerate(federated_train_loader):
        model.send(data.location)  # the model goes to the worker that holds this batch
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        model.get()  # and comes back, one step further
        if batch_idx % args.log_interval == 0:
            loss = loss.get()  # a pointer until now: the value was on the worker
            losses["federated training"].append(loss.item())
            steps = len(federated_train_loader)
            print(
                f"Train Epoch: {epoch} [{batch_idx * args.batch_size}/{steps * args.batch_size} "
                f"({100.0 * batch_idx / steps:.0f}%)]\tLoss: {loss.item():.6f}"
            )


def test(args, model, device, test_loader):  # type: ignore[no-untyped-def]
    model.eval()
    test_loss = 0.0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    n = len(test_loader.dataset)
    test_loss /= n
    print(
        f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{n} ({100.0 * correct / n:.0f}%)\n"
    )


model = Net().to(device)
optimizer = optim.SGD(model.parameters(), lr=args.lr)  # plain SGD, as the tutorial (no momentum)

for epoch in range(1, args.epochs + 1):
    train(args, model, device, federated_train_loader, optimizer, epoch)
    test(args, model, device, test_loader)

if args.save_model:
    torch.save(model.state_dict(), "mnist_cnn.pt")
