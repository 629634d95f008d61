"""Layer 7: experiments, the application around the engine.

A typed experiment parsed once from TOML (`config`: every default in one place), how its workers
are run (`workers`: in this process, in worker processes with `simulation`, in Ray actors with
`ray_hosts`, or on remote servers), the models experiments name (`models`), and the run itself (`run`):

```python
from fedsecure.experiment import load, run_experiment

history = run_experiment(load("examples/digits.toml", {"experiment.rounds": 3}))
```
"""

from fedsecure.experiment.config import Config, Experiment, SecureAggregation, load, parse
from fedsecure.experiment.models import MODELS, build_model
from fedsecure.experiment.ray_hosts import RaySimulation
from fedsecure.experiment.run import run_experiment
from fedsecure.experiment.simulation import Simulation

__all__ = [
    "MODELS",
    "Config",
    "Experiment",
    "RaySimulation",
    "SecureAggregation",
    "Simulation",
    "build_model",
    "load",
    "parse",
    "run_experiment",
]
