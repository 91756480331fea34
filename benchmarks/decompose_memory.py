#!/usr/bin/env python
"""Memory of one decompose job as the model grows: it must hold one layer, never the whole model.

For each N in --layers, writes a synthetic LLaMA-7B-shaped checkpoint with N decoder layers
(hidden 4096, intermediate 11008, random weights, one safetensors shard per layer plus an index and
a glrs_manifest.json as glrs.modelio.prepare_model writes them; layer shards are hard links into
one pool, so N=8 costs the disk of 8 layers, not 2+4+8), then runs `glrs decompose` on its last
layer in a fresh subprocess with a small max_iter and records:

- peak RSS of the job (its own getrusage ru_maxrss, and the parent's wait4 view of the child),
- peak CUDA memory allocated and reserved (torch.cuda.max_memory_*) on a GPU,
- the same for a baseline process that only imports torch and glrs (and starts CUDA),

and reports whether the peaks stay flat in N (spread below --flat-tolerance of the largest).

    python benchmarks/decompose_memory.py                          # CUDA, 7B shapes, N = 2, 4, 8 (~2-3 min on one H100)
    python benchmarks/decompose_memory.py --small --device cpu     # hidden 512, N = 2, 8, 32: local check (~1 min)

The fingerprint in the synthetic manifests is a cheap stand-in (sha256 of names, shapes, dtypes and
the seed), marked as such; decompose does not read it. Writes --out (default
results/benchmarks/decompose_memory.json) atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGETS = {  # as glrs.modelio.TARGETS
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def target_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
            "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}


def layer_tensors(layer: int, hidden: int, intermediate: int, dtype, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * 100003 + layer)
    out = {}
    for short, (m, n) in target_shapes(hidden, intermediate).items():
        out[f"model.layers.{layer}.{TARGETS[short]}.weight"] = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    out[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    out[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    return out


def write_pool_layer(pool: Path, layer: int, hidden: int, intermediate: int, dtype, seed: int) -> tuple[Path, list[str]]:
    """One layer's shard in the pool (written once, reused by every N)."""
    from safetensors.torch import save_file

    path = pool / f"layer-{layer:05d}.safetensors"
    names = sorted([f"model.layers.{layer}.{p}.weight" for p in TARGETS.values()]
                   + [f"model.layers.{layer}.input_layernorm.weight", f"model.layers.{layer}.post_attention_layernorm.weight"])
    if not path.exists():
        tensors = layer_tensors(layer, hidden, intermediate, dtype, seed)
        assert sorted(tensors) == names
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        del tensors
        os.replace(tmp, path)
    return path, names


def write_checkpoint(out: Path, pool: Path, n_layers: int, hidden: int, intermediate: int, vocab: int, dtype_name: str,
                     seed: int) -> dict:
    """A prepared-checkpoint directory: config.json, per-layer shards, index, glrs_manifest.json."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    fp = hashlib.sha256(f"synthetic seed={seed} dtype={dtype_name}\n".encode())
    for layer in range(n_layers):
        src, names = write_pool_layer(pool, layer, hidden, intermediate, dtype, seed)
        dst = out / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        weight_map.update({name: dst.name for name in names})
    g = torch.Generator().manual_seed(seed)
    rest = {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype),
        "model.norm.weight": torch.ones(hidden, dtype=dtype),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype),
    }
    save_file(rest, str(out / "rest.safetensors"))
    weight_map.update({name: "rest.safetensors" for name in rest})
    elem = torch.tensor([], dtype=dtype).element_size()
    total_bytes = sum(os.path.getsize(out / f) for f in set(weight_map.values()))
    for name in sorted(weight_map):
        fp.update(f"{name}\n".encode())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    heads = max(1, hidden // 128)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": dtype_name,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    manifest = {
        "spec": f"synthetic-llama-{hidden}x{intermediate}-{n_layers}L",
        "source_kind": "hf_dir",
        "source_key": fp.hexdigest(),
        "model_type": "llama",
        "num_layers": n_layers,
        "dtype": dtype_name,
        "targets": {s: list(shape) for s, shape in target_shapes(hidden, intermediate).items()},
        "fingerprint": fp.hexdigest(),
        "fingerprint_note": "cheap stand-in: sha256 of names, dtype and seed, not of the bytes (benchmark checkpoint)",
    }
    (out / "glrs_manifest.json").write_text(json.dumps(manifest, indent=2))
    layer_bytes = sum(m * n for m, n in target_shapes(hidden, intermediate).values()) * elem
    return {"checkpoint_bytes": total_bytes, "target_bytes_per_layer": layer_bytes}


# ---- the measured job (a fresh subprocess) ------------------------------------------------------

def child(args) -> int:
    """Run `glrs decompose` in this process (exactly the CLI's code path) and report peak memory."""
    t0 = time.perf_counter()
    import torch

    from glrs import cli

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context, as the job will have it
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rc = 0
    if not args.noop:
        rc = cli.main(["decompose", "--model-dir", args.model_dir, "--layer", str(args.layer),
                       "--params", args.params, "--device", args.device, "--out", args.job_out])
    report = {
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_before,
    }
    if cuda:
        report |= {"peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(),
                   "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved(),
                   "cuda_device": torch.cuda.get_device_name()}
    Path(args.report).write_text(json.dumps(report))
    return rc


def run_job(model_dir: Path, layer: int, params: str, device: str, work: Path, noop: bool = False,
            threads: int | None = None) -> dict:
    report = work / f"report-{os.getpid()}-{time.monotonic_ns()}.json"
    out = work / "job-out.safetensors"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model-dir", str(model_dir), "--layer", str(layer),
           "--params", params, "--device", device, "--job-out", str(out), "--report", str(report)]
    if noop:
        cmd.append("--noop")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"decompose job failed (rc {proc.returncode}):\n{output}")
    result = json.loads(report.read_text())
    report.unlink()
    result["wall_seconds"] = time.perf_counter() - t0
    result["peak_rss_bytes_wait4"] = usage.ru_maxrss * 1024
    result["log"] = output.strip().splitlines()[-8:]
    if out.exists():
        result["output_bytes"] = out.stat().st_size
        out.unlink()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--noop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cuda | cpu | auto (default: cuda when torch sees a GPU)")
    p.add_argument("--small", action="store_true",
                   help="hidden 512, intermediate 1376, N = 2, 8, 32 (quick CPU check: a job that loaded the whole "
                        "model would grow by ~190 MB from N=2 to N=32)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int, default=1024, help="embedding rows (decompose never reads them)")
    p.add_argument("--layers", help="model depths N to compare (default 2,4,8; 2,8,32 with --small)")
    p.add_argument("--dtype", default="float16", help="checkpoint dtype (Llama-2-7b ships float16)")
    p.add_argument("--solver-dtype", default="float64", help="rpca.dtype of the job (the pipeline default)")
    p.add_argument("--max-iter", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the jobs")
    p.add_argument("--flat-tolerance", type=float, default=0.10)
    p.add_argument("--work-dir", help="where the checkpoints go (default: a temporary directory, removed after)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "decompose_memory.json"))
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    from glrs.cas import write_json_atomic

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hidden = args.hidden or (512 if args.small else 4096)
    intermediate = args.intermediate or (1376 if args.small else 11008)
    depths = sorted(int(x) for x in (args.layers or ("2,8,32" if args.small else "2,4,8")).split(","))
    params = json.dumps({"lambda_scale": 1.0, "tol": 1e-7, "max_iter": args.max_iter, "rho": 1.5,
                         "mu_factor": 1.25, "dtype": args.solver_dtype}, sort_keys=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="glrs-decompose-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "pool"
    pool.mkdir(exist_ok=True)
    start = time.monotonic()
    report = {
        "benchmark": "decompose_memory",
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": device,
                        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
                        "host_cpus": os.cpu_count()},
        "settings": {"hidden": hidden, "intermediate": intermediate, "vocab": args.vocab, "layers": depths,
                     "checkpoint_dtype": args.dtype, "params": json.loads(params), "device": device},
        "what": "one `glrs decompose` job on the last layer of an N-layer synthetic checkpoint, in a fresh process; "
                "peaks must not grow with N (the job reads one layer through safetensors' lazy safe_open)",
        "runs": [],
    }
    try:
        print(f"baseline process (imports{' + CUDA context' if device.startswith('cuda') else ''})", flush=True)
        write_checkpoint(work / "ckpt-1", pool, 1, hidden, intermediate, args.vocab, args.dtype, args.seed)
        report["baseline"] = run_job(work / "ckpt-1", 0, params, device, work, noop=True, threads=args.threads)
        for n in depths:
            t = time.perf_counter()
            info = write_checkpoint(work / f"ckpt-{n}", pool, n, hidden, intermediate, args.vocab, args.dtype, args.seed)
            write_s = time.perf_counter() - t
            print(f"N={n}: checkpoint {info['checkpoint_bytes'] / 2**30:.2f} GiB ({write_s:.1f} s); decompose layer {n - 1}",
                  flush=True)
            job = run_job(work / f"ckpt-{n}", n - 1, params, device, work, threads=args.threads)
            run = {"num_layers": n, "layer": n - 1, "checkpoint_write_seconds": write_s, **info, **job}
            report["runs"].append(run)
            print(f"  peak RSS {job['peak_rss_bytes'] / 2**20:.0f} MiB"
                  + (f", peak CUDA {job['peak_cuda_allocated_bytes'] / 2**20:.0f} MiB" if "peak_cuda_allocated_bytes" in job else "")
                  + f", {job['seconds']:.1f} s", flush=True)
            shutil.rmtree(work / f"ckpt-{n}")
            report["total_seconds"] = time.monotonic() - start
            write_json_atomic(args.out, report)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    def spread(key):
        vals = [r[key] for r in report["runs"] if key in r]
        if not vals:
            return None
        return {"min": min(vals), "max": max(vals), "relative_spread": (max(vals) - min(vals)) / max(vals)}

    base = report["baseline"]["peak_rss_bytes"]
    summary = {
        "peak_rss": spread("peak_rss_bytes"),
        "peak_cuda_allocated": spread("peak_cuda_allocated_bytes"),
        "peak_rss_above_baseline_bytes": [r["peak_rss_bytes"] - base for r in report["runs"]],
        "checkpoint_bytes": [r["checkpoint_bytes"] for r in report["runs"]],
        "target_bytes_per_layer": report["runs"][0]["target_bytes_per_layer"] if report["runs"] else None,
    }
    flat = [s["relative_spread"] <= args.flat_tolerance for s in (summary["peak_rss"], summary["peak_cuda_allocated"]) if s]
    summary["flat_in_num_layers"] = all(flat) if flat else None
    summary["flat_tolerance"] = args.flat_tolerance
    report["summary"] = summary
    report["total_seconds"] = time.monotonic() - start
    write_json_atomic(args.out, report)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s)")
    return 0 if summary["flat_in_num_layers"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
