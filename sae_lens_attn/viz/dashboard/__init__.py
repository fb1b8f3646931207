"""Feature dashboards for hook_z SAEs: SAEDashboard's pages where it serves (TransformerLens
models), our own pages elsewhere (Hugging Face models through nnsight), both with DFA and
head-attribution panels; self-contained folders that open from disk without a network."""

from sae_lens_attn.viz.dashboard.build import ENGINES, Dashboard, Engine, build_dashboard
from sae_lens_attn.viz.dashboard.data import FeatureContext, FeatureData, collect

__all__ = [
    "ENGINES",
    "Dashboard",
    "Engine",
    "FeatureContext",
    "FeatureData",
    "build_dashboard",
    "collect",
]
