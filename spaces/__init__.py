"""spaces: what the search may choose per layer, what each choice costs, and budget-feasible plans."""

from spaces.candidates import DENSE, Candidate, LayerSpace, candidate_key
from spaces.presets import PRESETS, UNIFORM_RATIOS, UNIFORM_RULES, Preset
from spaces.space import DEFAULT_MAX_CANDIDATES, Cost, LatencyTable, SearchSpace, build_space

__all__ = [
    "build_space", "SearchSpace", "LayerSpace", "Candidate", "Cost", "LatencyTable", "candidate_key", "DENSE",
    "Preset", "PRESETS", "UNIFORM_RULES", "UNIFORM_RATIOS", "DEFAULT_MAX_CANDIDATES",
]
