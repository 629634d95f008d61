"""PySyft 0.2 tutorial, Part 7 (federated learning with a FederatedDataset), retold for fedsecure.

The same calls, in the same order, as PySyft 0.2.9's Part 7: the sandbox's grid is searched for a
regression data set spread over six workers, the pieces become a ``FederatedDataset``, and a
``FederatedDataLoader`` feeds a linear model that visits each batch's worker, with one Adam
optimizer per worker (each optimizer's state lives where its worker's batches are).

PySyft's sandbox served Boston housing; scikit-learn no longer ships it (removed in version 1.2),
so fedsecure's sandbox serves scikit-learn's diabetes data set, and this script searches for
"#diabetes" where PySyft's searched for "#boston". The sandbox's data is sent from this process,
as in PySyft, so it is the model owner's own and the trained model may come back.

Run: python examples/pysyft/part07_federated_dataset.py   (FEDSECURE_TUTORIAL_FULL=1: 50 epochs)
"""

import os

import torch as th

import fedsecure as sy

losses: dict[str, list[float]] = {"federated training": []}

sy.create_sandbox(globals(), verbose=False)

# Find the data set and its targets on every worker of the grid.
diabetes_data = grid.search("#diabetes", "#data")  # noqa: F821 (create_sandbox defines grid)
diabetes_target = grid.search("#diabetes", "#target")  # noqa: F821

n_features = diabetes_data["alice"][0].shape[1]
n_targets = 1

model = th.nn.Linear(n_features, n_targets)

# Each worker's pieces become one BaseDataset; together they make a FederatedDataset.
datasets = []
for worker in diabetes_data.keys():  # noqa: SIM118 (as the tutorial writes it)
    dataset = sy.BaseDataset(diabetes_data[worker][0], diabetes_target[worker][0])
    datasets.append(dataset)

dataset = sy.FederatedDataset(datasets)
print(dataset.workers)

optimizers = {}
for worker in dataset.workers:
    optimizers[worker] = th.optim.Adam(params=model.parameters(), lr=1e-2)

train_loader = sy.FederatedDataLoader(dataset, batch_size=32, shuffle=False, drop_last=False)

epochs = 50 if os.environ.get("FEDSECURE_TUTORIAL_FULL") == "1" else 10
for epoch in range(1, epochs + 1):
    loss_accum = 0.0
    for batch_idx, (data, target) in enumerate(train_loader):
        model.send(data.location)

        optimizer = optimizers[data.location.id]
        optimizer.zero_grad()
        pred = model(data)
        loss = ((pred.view(-1) - target) ** 2).mean()
        loss.backward()
        optimizer.step()

        model.get()
        loss = loss.get()

        loss_accum += float(loss)

        if batch_idx % 8 == 0:
            print(f"Train Epoch: {epoch} Batch {batch_idx}/{len(train_loader)}: loss {loss.item():.1f}")

    print("Total loss", loss_accum)
    losses["federated training"].append(loss_accum)
