"""Neural-network modules on top of the MPS operator: Multi-Prompts Sinkhorn
Attention and the OTSeg decoder (SPEC section 2). See README.md beside this file."""

from .mpsa import *  # noqa: F401,F403  (the public names are mpsa.__all__)
from .mpsa import __all__  # noqa: F401
