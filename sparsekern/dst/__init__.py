"""Dynamic sparse training: move each layer's blocks (prune + grow) every few hundred steps."""
from .bidst import BiDST
from .methods import SET, RigL
from .scheduler import DSTScheduler

__all__ = ["BiDST", "DSTScheduler", "RigL", "SET"]
