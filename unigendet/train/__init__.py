"""Training: ``python -m unigendet.train`` (stage 1 GDUF, stage 2 DIGA, co-evolution rounds)."""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "Trainer", "load_config", "train"]


def __getattr__(name):
    # The loop pulls in the model and data packages; import it on first use only.
    if name in ("Trainer", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
