"""Drop-in ``torch.optim`` classes that run on the worker holding the parameters.

See `fedsecure.pointer.optim`; ``from fedsecure import optim`` then ``optim.SGD(...)``.
"""

from fedsecure.pointer.optim import SGD, Adagrad, Adam, AdamW, RMSprop

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop"]
