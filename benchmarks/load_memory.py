#!/usr/bin/env python
"""Host memory while loading a compressed model with glrs.load: results/benchmarks/load_memory.json.

Each compressed directory is loaded in a fresh process (so that no earlier allocation is reused). The
process imports torch, transformers and glrs and the model's modeling code (by building its skeleton on the
meta device once: transformers imports it lazily; ~140 MB for Llama, the same for any checkpoint size), reads
its resident set (the baseline), loads the model, and reads its peak resident set (VmHWM). `load_bytes` = peak - baseline is compared with the
bytes of the files it reads (rest.safetensors + the layer files); the target is <= 1.2x.

    python benchmarks/load_memory.py results/compressed/<key> [...]
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path("results/benchmarks/load_memory.json")
CHILD = r"""
import json, sys
import torch, transformers, glrs, glrs.compressed as c

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

imported = status("VmRSS:")
# Import the model's code (transformers loads modeling modules lazily) by building its skeleton on the meta
# device once: code, not weights, and the same for any checkpoint size.
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with c._params_on_meta():
    transformers.AutoModelForCausalLM.from_config(config)
base = status("VmRSS:")
model = glrs.load(sys.argv[1])
peak, now = status("VmHWM:"), status("VmRSS:")
print(json.dumps({"imports_rss": imported, "baseline_rss": base, "peak_rss": peak, "rss_after": now,
                  "modules": sum(isinstance(m, c.LowRankSparseLinear) for m in model.modules())}))
"""


def files_read(path: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from glrs import compressed

    header = compressed.read_format(path)
    names = {compressed.REST_FILE, *(t["file"] for t in header["targets"].values())}
    return sum((path / n).stat().st_size for n in names)


def main() -> None:
    records = []
    for arg in sys.argv[1:]:
        path = Path(arg)
        out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        size = files_read(path)
        load = rec["peak_rss"] - rec["baseline_rss"]
        info = json.loads((path / "info.json").read_text()) if (path / "info.json").is_file() else {}
        records.append({"compressed": path.name, "method": info.get("method"), "allocator": info.get("allocator"),
                        "target_density": info.get("target_density"), "file_bytes": size, "load_bytes": load,
                        "ratio": round(load / size, 4), **rec})
        print(json.dumps(records[-1]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from glrs import cas

    cas.write_json_atomic(OUT, {"benchmark": "load_memory", "command": " ".join(sys.argv), "runs": records})


if __name__ == "__main__":
    main()
