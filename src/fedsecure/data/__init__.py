"""Layer 8: data sets that ship with packages, your own data, and partitioners over workers.

```python
from fedsecure.data import load_digits, federate, partition, partition_summary

digits = load_digits()                                      # no download: ships with scikit-learn
shares = federate(digits, 4, scheme="dirichlet", alpha=0.3) # [(x, y), ...], one pair per worker
parts = partition(digits.y_train, 4, scheme="shards", classes_per_worker=2)
print(partition_summary(digits.y_train, parts, digits.num_classes))
```

Loaders return a `Dataset` (float32 inputs, int64 labels, a train and a test split). Partitioners
return one index array per worker, seeded, covering every training sample exactly once.
"""

from fedsecure.data.datasets import Dataset, load_arrays, stratified_split
from fedsecure.data.federate import Scheme, federate, partition
from fedsecure.data.files import load_csv, load_npz
from fedsecure.data.idx import read_idx, write_idx
from fedsecure.data.packaged import FASHION_MNIST_DIR, load_digits, load_fashion_mnist
from fedsecure.data.partition import dirichlet, iid, quantity_skew, shards
from fedsecure.data.summary import (
    label_skew,
    partition_counts,
    partition_csv,
    partition_records,
    partition_summary,
)
from fedsecure.errors import DatasetError, DatasetNotFound, PartitionError

__all__ = [
    "FASHION_MNIST_DIR",
    "Dataset",
    "DatasetError",
    "DatasetNotFound",
    "PartitionError",
    "Scheme",
    "dirichlet",
    "federate",
    "iid",
    "label_skew",
    "load_arrays",
    "load_csv",
    "load_digits",
    "load_fashion_mnist",
    "load_npz",
    "partition",
    "partition_csv",
    "partition_counts",
    "partition_records",
    "partition_summary",
    "quantity_skew",
    "read_idx",
    "shards",
    "stratified_split",
    "write_idx",
]
