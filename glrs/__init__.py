"""glrs: global low-rank + sparse compression of large language models (CAP, arXiv 2505.03801)."""
__version__ = "0.1.0"


def load(path, device: str = "cpu", dtype=None, semi_structured: bool = False):
    """A compressed model directory as a ready model (glrs.compressed.load: built from its compact files)."""
    from .compressed import load as _load

    return _load(path, device, dtype, semi_structured)
