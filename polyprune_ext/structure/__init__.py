"""Structural pruning of any network: which channels go together (analysis, rules), which to
remove (policy), removing them (surgery), what a model costs (stats), and the plan that records
every step so a pruned model saves as plain weights and loads again (plan)."""

from .analysis import Analysis, Tracer, analyze
from .latency import LatencyModel, latency_model
from .plan import PruningPlan, load, read_plan, save
from .policy import cost, select_channels
from .rules import OpCall, rule
from .spaces import Attribute, ChannelGroup, Gate, Slot, Space
from .stats import Dropped, ModelStats, drop_unused_, model_stats
from .surgery import prune_, zero_channels

__all__ = ["Analysis", "Attribute", "ChannelGroup", "Dropped", "Gate", "LatencyModel", "ModelStats", "OpCall",
           "PruningPlan", "Slot", "Space", "Tracer", "analyze", "cost", "drop_unused_", "latency_model", "load",
           "model_stats", "prune_", "read_plan", "rule", "save", "select_channels", "zero_channels"]
