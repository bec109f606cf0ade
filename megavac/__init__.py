"""megavac: massively multilingual NMT on DeepSpeed with per-language gradient methods."""

__version__ = "0.1.0"
