"""The operations a worker executes: an explicit table, nothing else.

A message names an op by a string from this table; the worker looks the string
up here and never resolves names any other way (no getattr on message data, no
imports). Left out on purpose: I/O of any kind (``torch.load``, ``save``,
``from_file``), storage and pointer access (``data_ptr``, ``untyped_storage``,
``set_``), uninitialised memory (``empty``, ``empty_like``: it can hold freed
private data), hooks (``register_hook``, ``retain_grad``) and anything that
returns Python objects other than tensors and plain values.

`markdown()` renders the table; ``make docs`` writes it to docs/allowlist.md and
a test keeps that file current.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedsecure.errors import OperationNotAllowed, ProtocolError
from fedsecure.worker import update_rules

_ARITHMETIC = """
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__
__truediv__ __rtruediv__ __itruediv__ __floordiv__ __rfloordiv__ __mod__ __pow__ __rpow__
__ipow__ __matmul__ __rmatmul__ __neg__ __abs__ __and__ __or__ __xor__ __invert__
__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __getitem__ __setitem__
add add_ sub sub_ mul mul_ div div_ true_divide pow pow_ neg neg_ abs abs_ reciprocal
exp exp_ log log_ log1p expm1 sqrt sqrt_ rsqrt square sign sin cos erf
sigmoid sigmoid_ tanh tanh_ relu relu_ clamp clamp_ clip clip_ round floor ceil trunc
maximum minimum lerp lerp_ addcmul addcmul_ addcdiv addcdiv_ conj
mm matmul bmm mv dot outer
eq ne lt le gt ge isnan isfinite nan_to_num where masked_fill masked_fill_
zero_ fill_ copy_ mul_ detach detach_ clone contiguous requires_grad_
sum mean prod max min amax amin argmax argmin std var norm logsumexp cumsum
all any softmax log_softmax topk sort
t transpose permute view view_as reshape reshape_as flatten squeeze unsqueeze
expand expand_as repeat flip roll narrow select chunk split unbind gather index_select
float double half bfloat16 long int bool to type_as cpu new_zeros new_ones new_full
item tolist __bool__ __float__ __int__ equal backward
"""

_PROPERTIES = "grad.__get__ grad.__set__ data.__get__ data.__set__ T.__get__"

_TORCH = """
add sub mul div true_divide pow exp log log1p sqrt abs neg sign square sigmoid tanh relu
clamp clip maximum minimum lerp addcmul addcdiv where erf
matmul mm bmm mv dot outer sum mean prod max min amax amin argmax argmin std var norm
logsumexp cumsum all any softmax log_softmax topk sort eq ne lt le gt ge equal isclose
allclose isnan isfinite nan_to_num stack cat flatten reshape transpose squeeze unsqueeze t
chunk split unbind gather index_select flip roll clone detach
zeros_like ones_like full_like rand_like randn_like
"""

_FUNCTIONAL = """
linear bilinear relu relu6 leaky_relu elu gelu silu sigmoid tanh softplus softmax log_softmax
dropout conv1d conv2d max_pool1d max_pool2d avg_pool1d avg_pool2d adaptive_avg_pool2d
batch_norm layer_norm group_norm embedding one_hot normalize pad cosine_similarity
mse_loss l1_loss smooth_l1_loss huber_loss cross_entropy nll_loss kl_div
binary_cross_entropy binary_cross_entropy_with_logits
"""


def _build() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for name in _ARITHMETIC.split():
        table[f"Tensor.{name}"] = getattr(torch.Tensor, name)
    for name in _PROPERTIES.split():
        prop, accessor = name.split(".")
        table[f"Tensor.{name}"] = getattr(getattr(torch.Tensor, prop), accessor)
    for name in _TORCH.split():
        table[f"torch.{name}"] = getattr(torch, name)
    for name in _FUNCTIONAL.split():
        table[f"F.{name}"] = getattr(F, name)
    return table


ALLOWED: dict[str, Callable[..., Any]] = _build()
"""op name -> the callable a worker runs for it."""

OPTIMIZERS: dict[str, type[update_rules.Optimizer]] = {
    cls.name: cls for cls in (update_rules.SGD, update_rules.Adam, update_rules.AdamW, update_rules.Adagrad,
                              update_rules.RMSprop)
}
"""optimizers a worker builds next to the parameters they update (fedsecure.optim, a round's
training): torch.optim's update rules (`fedsecure.worker.update_rules`)."""

OPTIMIZER_HYPERPARAMETERS = frozenset(
    ["lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "betas", "eps", "amsgrad", "alpha", "centered", "lr_decay", "initial_accumulator_value"]
)
"""the only group settings a message may set; anything else (foreach, fused, capturable,
differentiable, ...) keeps torch's default."""


def optimizer_settings(
    settings: Mapping[Any, Any], *, skip: Collection[str] = (), reserved: Collection[str] = (), where: str = ""
) -> dict[str, Any]:
    """``settings`` as received for an optimizer (a parameter group, a round's ``optimizer_args``),
    checked: only `OPTIMIZER_HYPERPARAMETERS`, each a number or up to four numbers (a list becomes a
    tuple). ``skip``: keys that are no settings (a group's ``params``); ``reserved``: settings the
    message gives elsewhere, refused here; ``where`` ends the refusal's message."""
    checked = {}
    for key, value in settings.items():
        if key in skip:
            continue
        if key not in OPTIMIZER_HYPERPARAMETERS or key in reserved:
            raise OperationNotAllowed(f"optimizer setting {key!r} is not allowed{where}", op=str(key))
        if not isinstance(value, bool | int | float) and not (
            isinstance(value, list | tuple) and len(value) <= 4 and all(isinstance(v, int | float) for v in value)
        ):
            raise ProtocolError(f"optimizer setting {key!r} must be a number or a pair of numbers")
        checked[key] = tuple(value) if isinstance(value, list) else value
    return checked

NAME_OF: dict[Any, str] = {}
"""callable -> op name (the client side's lookup, keyed by what __torch_function__ sees)."""
for _name, _fn in ALLOWED.items():
    NAME_OF.setdefault(_fn, _name)


def markdown() -> str:
    groups = {"Tensor": [], "torch": [], "F": []}  # type: dict[str, list[str]]
    for name in sorted(ALLOWED):
        prefix, _, rest = name.partition(".")
        groups[prefix].append(rest)
    lines = [
        "# Operations a worker executes",
        "",
        "Generated from `fedsecure/worker/allowlist.py` by `make docs`; every other operation is refused",
        "with `fedsecure.OperationNotAllowed`. `F` is `torch.nn.functional`.",
        "",
        "| namespace | operations |",
        "| --- | --- |",
    ]
    titles = {"Tensor": "`torch.Tensor` methods and properties", "torch": "`torch`", "F": "`F`"}
    for prefix, names in groups.items():
        lines.append(f"| {titles[prefix]} | {', '.join(f'`{n}`' for n in names)} |")
    lines.append(f"| optimizers (`fedsecure.optim`) | {', '.join(f'`{n}`' for n in OPTIMIZERS)} |")
    settings = ", ".join(f"`{n}`" for n in sorted(OPTIMIZER_HYPERPARAMETERS))
    lines.append(f"| optimizer settings | {settings} |")
    return "\n".join(lines) + "\n"

