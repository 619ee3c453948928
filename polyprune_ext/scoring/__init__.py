"""Channel importance: TaylorFO scores from the fused kernel (score, and Pruner inside training
steps) and the data-free baselines they are compared with (baseline_scores)."""

from .baselines import baseline_scores
from .pruner import Pruner
from .scores import Scores
from .taylor import score

__all__ = ["Pruner", "Scores", "baseline_scores", "score"]
