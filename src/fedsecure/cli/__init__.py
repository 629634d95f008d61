"""Layer 8: the ``fedsecure`` command.

``fedsecure run`` and ``fedsecure plot`` (`experiment`), ``fedsecure worker serve`` (`worker`),
``fedsecure certs`` (`certs`); `main` parses the command line.
"""

from fedsecure.cli.main import main

__all__ = ["main"]
