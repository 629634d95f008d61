"""Layer 5: the FedAvg engine: strategies, worker-side local training, secure rounds, checkpoints
and history. Experiment files, where their workers run and the models they name are the
application around it, in `fedsecure.experiment`."""

from fedsecure.fl.engine import Engine, RoundFailed, load_parameters, parameters_of
from fedsecure.fl.fitting import fit
from fedsecure.fl.history import History
from fedsecure.fl.strategy import (
    DPSGD,
    STRATEGIES,
    AggregationRule,
    ConfigurationError,
    EvaluateAggregate,
    EvaluatePlan,
    Failure,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedProx,
    FedYogi,
    FitAggregate,
    FitPlan,
    LocalTraining,
    Parameters,
    Strategy,
)

__all__ = [
    "Engine",
    "History",
    "RoundFailed",
    "fit",
    "load_parameters",
    "parameters_of",
    "STRATEGIES",
    "AggregationRule",
    "ConfigurationError",
    "DPSGD",
    "EvaluateAggregate",
    "EvaluatePlan",
    "Failure",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "FitAggregate",
    "FitPlan",
    "LocalTraining",
    "Parameters",
    "Strategy",
]
