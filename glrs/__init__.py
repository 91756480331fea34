"""glrs: global low-rank + sparse compression of large language models (CAP, arXiv 2505.03801)."""
__version__ = "0.1.0"
