"""The papers' analyses of a user's own run: gradient similarity between languages (GradVac §2), per-language
curvature (CATS Figure 2), comparisons of evaluated runs. Entry point: ``python -m megavac.analysis``."""
