"""Layer 6: differential privacy for federated training: DP-FedAvg as a strategy wrapper, and accounting.

```python
from fedsecure.fl import FedAdam
from fedsecure.privacy import DPFedAvg

strategy = DPFedAvg(FedAdam(), noise_multiplier=1.0, clip_norm=0.5, budget_epsilon=8.0)
```

See docs/privacy_dp_robust.md for what the (epsilon, delta) reported here promise, and what not.
"""

from fedsecure.privacy.accounting import KINDS, Accountant, AccountingError, Kind, round_event
from fedsecure.privacy.dp import DPFedAvg, PrivacyBudgetExhausted, update_noise_multiplier

__all__ = [
    "KINDS",
    "Accountant",
    "AccountingError",
    "DPFedAvg",
    "Kind",
    "PrivacyBudgetExhausted",
    "round_event",
    "update_noise_multiplier",
]
