"""`glrs verify`: recompute a sample of cached intermediates and compare their bytes (DESIGN.md section 4).

The CI reproducibility check: same inputs, same parameters, same code → the
same file, bit for bit, on the CPU. Every decomposition file records the
parameters it was made with, and its path names the model it came from, so
it can be recomputed without the config.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

from . import cas, pipeline
from .errors import GlrsError


def verify_rpca(results: str | Path = "results", sample: int = 2, seed: int = 0) -> list[dict]:
    """Recompute `sample` decomposition files (chosen with `seed`) and compare sha256 with the cached ones."""
    results = Path(results)
    files = sorted(results.glob("rpca/*/*/layer_*.safetensors"))
    if not files:
        raise GlrsError(f"no decompositions under {results}/rpca to verify; run the pipeline first")
    chosen = random.Random(seed).sample(files, min(sample, len(files)))
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in chosen:
            model_key = path.parent.parent.name
            meta, _ = pipeline.read_rpca_layer(path)
            again = Path(tmp) / path.name
            pipeline.decompose_layer(str(results / "model" / model_key), meta["layer"], meta["params"], str(again), "cpu")
            cached, fresh = cas.sha256_file(path), cas.sha256_file(again)
            report.append({"file": str(path), "cached": cached, "recomputed": fresh, "identical": cached == fresh})
    return report
