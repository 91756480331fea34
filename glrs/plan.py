"""The whole run, planned from the config before anything executes: every job's key and path.

Keys chain (docs/design.md section 4): the model key comes from the source's content
hash; each later key hashes its input keys, its own parameters and its stage's
code version. So changing target_density changes only allocation keys and
below, while the RPCA files (keyed by model + RPCA parameters) are found again.

Under `stage1: weights` (the default) Stage 1 is the trivial split L = 0, S = W: the plan has no
RPCA files and no decompose job, and every consumer splits the prepared model's weights in memory
(glrs.stage1). Its Stage-1 key hashes the model and that choice alone: RPCA's settings enter a key
only under `stage1: rpca`, where RPCA runs.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from . import allocate, cap, cas, compressed, data, evaluate, modelio, realise, rpca, stage1, stats
from .errors import GlrsError

RESULTS = "results"


@dataclass(frozen=True)
class Run:
    """One compressed model: a method (and allocator) at a target density."""

    method: str
    allocator: str
    density: float
    alloc_key: str
    comp_key: str
    params: dict = field(hash=False, compare=False)
    realise_key: str = ""  # CAP runs realised by glrs.realise (realise.mode refit, wanda, sparsegpt); "" = kept
    # candidates as they are (select)
    realiser: str = ""  # CAP runs: the realise.mode that spends this allocation (several when realise.mode is a list)

    @property
    def label(self) -> str:
        if not self.allocator:
            return f"{self.method}@{self.density}"
        return f"{self.method}/{self.allocator}{f'+{self.realiser}' if self.realiser else ''}@{self.density}"


@dataclass
class Plan:
    config: dict
    source: modelio.ModelSource
    model_key: str
    layers: list[int]
    stage1_key: str
    rpca_params: dict
    calib_key: str
    calib_params: dict
    runs: list[Run]
    eval_keys: dict[str, str]  # dataset -> key of the evaluation protocol + text
    zeroshot_key: str = ""  # key of the zero-shot protocol (tasks, limit, lm-eval, offline task text, seed); "" = none
    stats_key: str = ""  # key of the dense model's activation statistics (glrs.stats)
    realise_params: dict = field(default_factory=dict)  # those of the first realise.mode (the only one, usually)
    excluded: list[str] = field(default_factory=list)  # "label: why" of each (method, density) the config names but
    # that cannot run (N:M sparsity at a density it cannot keep); make_plan leaves them out, Snakefile says so
    realise_modes: dict = field(default_factory=dict)  # realise.mode -> its resolved settings (realise.mode a list:
    # several realisers, each CAP allocation spent by each)
    val_keys: dict = field(default_factory=dict)  # dataset -> key of the validation perplexity (evaluation.validation)

    def realise_params_of(self, run: Run) -> dict:
        """The resolved realise settings of one CAP run (those of its realiser)."""
        return self.realise_modes.get(run.realiser, self.realise_params)

    # ---- paths (relative to the working directory) ----
    @property
    def model_dir(self) -> str:
        return f"{RESULTS}/model/{self.model_key}"

    def rpca_file(self, layer: int) -> str:
        return f"{RESULTS}/rpca/{self.model_key}/{self.stage1_key}/layer_{layer}.safetensors"

    @property
    def stage1(self) -> str:
        """Where Stage 2's candidates come from: `weights` (L = 0, S = W, split in memory by the jobs that
        read them: no Stage-1 file) or `rpca` (one decompose job a layer)."""
        return self.config.get("stage1", "weights")

    @property
    def splits_weights(self) -> bool:
        return self.stage1 == "weights"

    @property
    def rpca_files(self) -> list[str]:
        """The decompose jobs' outputs; none under stage1 weights."""
        return [] if self.splits_weights else [self.rpca_file(i) for i in self.layers]

    def stage1_args(self, layers: list[int] | None = None) -> str:
        """The CLI arguments that name Stage 1 for a job that reads it (allocate, materialise, plot-spectra):
        its files, or under stage1 weights the layers to split (the job also gets --model-dir)."""
        layers = self.layers if layers is None else layers
        if self.splits_weights:
            return f"--split-layers {' '.join(map(str, layers))} --stage1-key {self.stage1_key}"
        return "--rpca " + " ".join(self.rpca_file(i) for i in layers)

    @property
    def calib_file(self) -> str:
        return f"{RESULTS}/calib/{self.model_key}/{self.calib_key}.safetensors"

    def stats_file(self, layer: int) -> str:
        return f"{RESULTS}/stats/{self.model_key}/{self.stats_key}/layer_{layer}.safetensors"

    @property
    def stats_files(self) -> list[str]:
        return [self.stats_file(i) for i in self.layers]

    @staticmethod
    def realised_file(run: Run, layer: int) -> str:
        return f"{RESULTS}/realise/{run.realise_key}/layer_{layer}.safetensors"

    def realised_files(self, run: Run) -> list[str]:
        return [self.realised_file(run, i) for i in self.layers]

    @property
    def realised_runs(self) -> list[Run]:
        return [r for r in self.cap_runs if r.realise_key]

    def run_by_realise_key(self, realise_key: str) -> Run:
        return next(r for r in self.runs if r.realise_key == realise_key)

    @staticmethod
    def alloc_json(run: Run) -> str:
        return f"{RESULTS}/alloc/{run.alloc_key}.json"

    def alloc_masks(self, run: Run) -> dict:
        """The keep-masks a materialise job reads ({} when the allocation kept prefixes)."""
        masked = run.alloc_key in self.masked_alloc_keys
        return {"masks": f"{RESULTS}/alloc/{run.alloc_key}.safetensors"} if masked else {}

    @property
    def masked_alloc_keys(self) -> list[str]:
        """Allocations whose per-candidate keep-masks a job reads: realise.mode select materialising CAP's
        per-candidate policies (every other allocator keeps prefixes, which the .json's per-matrix counts
        name). The realisers spend per-matrix budgets alone, so their allocations write no masks."""
        return sorted({r.alloc_key for r in self.cap_runs
                       if not r.realise_key and not cap.keeps_prefixes(r.allocator, r.params)})

    @property
    def budget_alloc_keys(self) -> list[str]:
        masked = set(self.masked_alloc_keys)
        return sorted({r.alloc_key for r in self.cap_runs} - masked)

    @staticmethod
    def compressed_dir(run: Run) -> str:
        return f"{RESULTS}/compressed/{run.comp_key}"

    def metrics_file(self, target: str, dataset: str, role: str = "evaluation") -> str:
        """target: 'dense-<model_key>' or a compressed key. A validation perplexity has a file of its own, of the
        same pattern: its key hashes the validation text (the record's `role` says which text it is)."""
        keys = self.val_keys if role == "validation" else self.eval_keys
        return f"{RESULTS}/metrics/{target}/ppl-{safe_name(dataset)}-{keys[dataset]}.json"

    def ppl_role(self, dataset: str, key: str) -> str:
        """Which text a perplexity key measures: 'evaluation' or 'validation'."""
        if self.val_keys.get(dataset) == key:
            return "validation"
        if self.eval_keys.get(dataset) == key:
            return "evaluation"
        raise GlrsError(f"no perplexity of {dataset!r} has key {key!r} in this plan")

    def calibration_dataset(self, target: str) -> str:
        """The calibration source behind a model under test; '' for the dense model, which saw none."""
        return "" if target == self.dense_target else self.calib_params["dataset"]

    def calibration_arg(self, target: str) -> str:
        """An evaluation job's --calibration-dataset (its record names that text); none for the dense model."""
        dataset = self.calibration_dataset(target)
        return f"--calibration-dataset {shlex.quote(dataset)}" if dataset else ""

    def allocate_command(self, alloc_key: str, inputs, outputs) -> str:
        """One allocation job's command line; --masks-out only where the rule declares the masks output."""
        run = self.run_by_alloc_key(alloc_key)
        calib = (f"--model-dir {inputs.model} " if "model" in inputs.keys() else "") + (
            f"--calib {inputs.calib} " if "calib" in inputs.keys() else "") + (
            f"--stats {' '.join(inputs.stats)}" if "stats" in inputs.keys() else "")
        masks = f"--masks-out {outputs.masks} " if "masks" in outputs.keys() else ""
        return (f"python -m glrs allocate {self.stage1_args()} --allocator {run.allocator} --density {run.density} "
                f"--params {shell_json(run.params)} --seed {self.config['seed']} {calib} --device {self.config['device']} "
                f"--json-out {outputs.json} {masks}")

    def dataset_by_safe_name(self, safe: str) -> str:
        return next(d for d in self.eval_keys if safe_name(d) == safe)

    def run_info(self, run: Run) -> dict:
        """What a compressed model's info.json records about how it was made (keys link it to its stages)."""
        info = {"method": run.method, "allocator": run.allocator, "seed": self.config["seed"], "model_key": self.model_key,
                "comp_key": run.comp_key, "layers": self.layers}
        if run.method == "cap":
            info |= {"stage1": self.stage1, "stage1_key": self.stage1_key, "alloc_key": run.alloc_key,
                     "variant": self.cap_variant(run)}
            if self.stage1 == "rpca":
                info["rpca_lambda_scale"] = self.rpca_params["lambda_scale"]
            return info | ({"realise_key": run.realise_key, "stats_key": self.stats_key} if run.realise_key else {})
        return info | {"calib_key": self.calib_key, "method_params": run.params}

    def cap_variant(self, run: Run) -> str:
        """Which CAP this is, in a few words: the Stage-1 candidates, the policy, its loss where set, and the realisation."""
        learned = run.allocator in allocate.NEEDS_CALIBRATION
        policy = run.params.get("policy", "") if learned else ""
        loss = run.params.get("loss", "") if learned else ""  # absent: the default (the variant as before)
        rp = self.realise_params_of(run)
        sparsity = rp.get("sparsity", "")  # absent: unstructured (the variant as before)
        return " ".join(x for x in (f"stage1={self.stage1}", f"policy={policy}" if policy else "", f"loss={loss}" if loss else "",
                                    f"realise={rp['mode']}", f"sparsity={sparsity}" if sparsity else "")
                        if x)

    def allocate_inputs(self, alloc_key: str) -> dict:
        """What one allocation job reads: every layer's factors (under stage1 weights: the model's
        weights), and the model and calibration text if it learns."""
        inputs = {"model": self.model_dir} if self.splits_weights else {"rpca": self.rpca_files}
        run = self.run_by_alloc_key(alloc_key)
        if run.allocator in allocate.NEEDS_CALIBRATION:
            inputs |= {"model": self.model_dir, "calib": self.calib_file}
        if allocate.needs_stats(run.allocator, run.params):
            inputs |= {"model": self.model_dir, "stats": self.stats_files}
        return inputs

    def model_under_test(self, target: str) -> dict:
        """The directory an evaluation job loads: the prepared model, or a compressed one."""
        return {"model": self.model_dir if target == self.dense_target else f"{RESULTS}/compressed/{target}"}

    @property
    def cap_runs(self) -> list[Run]:
        return [r for r in self.runs if r.method == "cap"]

    @property
    def baseline_runs(self) -> list[Run]:
        return [r for r in self.runs if r.method != "cap"]

    @property
    def spectra_layers(self) -> list[int]:
        """The layers of the spectra plot: plots.spectra_layers among the compressed ones, else the first."""
        wanted = self.config.get("plots", {}).get("spectra_layers", [0])
        return [i for i in wanted if i in self.layers] or self.layers[:1]

    @property
    def spectra_files(self) -> list[str]:
        """Their Stage-1 files (none under stage1 weights: the plot then shows W's spectra alone)."""
        return [] if self.splits_weights else [self.rpca_file(i) for i in self.spectra_layers]

    @property
    def dense_target(self) -> str:
        return f"dense-{self.model_key}"

    def all_metrics(self) -> list[str]:
        targets = [self.dense_target] + [r.comp_key for r in self.runs]
        return [self.metrics_file(t, d, role) for t in targets for d in self.config["evaluation"]["datasets"]
                for role in ("evaluation", "validation") if role == "evaluation" or self.val_keys]

    @property
    def zeroshot_tasks(self) -> list[str]:
        return list(self.config["evaluation"].get("zeroshot", {}).get("tasks", []))

    def zeroshot_file(self, target: str) -> str:
        return f"{RESULTS}/metrics/{target}/zeroshot-{self.zeroshot_key}.json"

    def all_zeroshot(self) -> list[str]:
        if not self.zeroshot_tasks:
            return []
        return [self.zeroshot_file(t) for t in [self.dense_target] + [r.comp_key for r in self.runs]]

    def run_by_comp_key(self, comp_key: str) -> Run:
        return next(r for r in self.runs if r.comp_key == comp_key)

    def run_by_alloc_key(self, alloc_key: str) -> Run:
        return next(r for r in self.runs if r.alloc_key == alloc_key)


def shell_json(obj) -> str:
    """A JSON argument for a shell command, quoted once."""
    return "'" + json.dumps(obj, sort_keys=True).replace("'", "'\\''") + "'"


def key_pattern(keys) -> str:
    """A wildcard constraint matching exactly these keys, so that two rules never claim one path."""
    return "|".join(keys) or "(?!)"


def safe_name(dataset: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)


def _layers(config: dict, num_layers: int) -> list[int]:
    if config["layers"] == "all":
        return list(range(num_layers))
    bad = [i for i in config["layers"] if i >= num_layers]
    if bad:
        raise GlrsError(f"config key layers: {bad} out of range; the model has {num_layers} layers (0..{num_layers - 1})")
    return sorted(config["layers"])


BASELINE_VERSION = 1


def _feasible(densities: list[float], why, what: str, excluded: list[str]) -> list[float]:
    """The densities at which `what` can run (why(d) == ""); the others are noted in `excluded`. None at all: an error."""
    keep = [d for d in densities if not why(d)]
    if not keep:
        raise GlrsError(f"config key target_density: {what} can run at none of {densities}: {why(densities[0])}")
    excluded += [f"{what}@{d}: {why(d)}" for d in densities if why(d)]
    return keep


def _baseline_runs(config: dict, method: str, model_key: str, calib_key: str, layers: list[int], num_layers: int,
                   excluded: list[str] | None = None) -> list[Run]:
    """Baselines compress every target matrix from the model and the shared calibration samples, at each
    target density the method can keep (N:M sparsity: see methods.density_infeasible; the others go to
    `excluded`)."""
    if layers != list(range(num_layers)):
        raise GlrsError(f"config key layers: method {method!r} compresses every layer; use layers: all, or methods: [cap] only")
    from . import methods

    # Unknown settings stop the plan here; defaults are hashed too, so a changed default is a new key.
    params = methods.effective_params(method, config.get("method_params", {}).get(method, {}))
    version = {"pipeline": str(BASELINE_VERSION), "method": str(methods.method_version(method)),
               "format": str(compressed.MATERIALISE_VERSION)}
    out = []
    densities = _feasible(list(config["target_density"]), lambda d: methods.density_infeasible(method, params, d),
                          method, [] if excluded is None else excluded)
    for density in densities:
        comp_key = cas.key_of("compress", BASELINE_VERSION, {"model": model_key, "calib": calib_key} | version,
                              {"method": method, "density": density, "params": params, "seed": config["seed"],
                               "export": config.get("export", "none")})
        out.append(Run(method, "", density, "", comp_key, params))
    return out


def make_plan(config: dict) -> Plan:
    source = modelio.resolve_source(config["model"], config.get("model_revision", "main"))
    model_key = cas.key_of("model", modelio.PREPARE_VERSION, {"source": source.key}, {"dtype": config["dtype"]})
    layers = _layers(config, source.num_layers)
    rpca_params = dict(rpca.DEFAULTS) | config.get("rpca", {})
    # The key of Stage 1's output: RPCA's settings feed it only where RPCA runs.
    if config.get("stage1", "weights") == "rpca":
        stage1_key = cas.key_of("rpca", rpca.RPCA_VERSION, {"model": model_key}, rpca_params)
    else:
        stage1_key = cas.key_of("stage1", stage1.WEIGHTS_VERSION, {"model": model_key}, {"candidates": "weights"})

    calib_params = dict(config["calibration"])
    calib_text = data.text_identity(calib_params["dataset"], "calibration")
    calib_key = cas.key_of("calib", data.DATA_VERSION, {"model": model_key, "text": calib_text},
                           calib_params | {"seed": config["seed"], "split": data.SPLIT_RULE})

    stats_key = cas.key_of("stats", stats.STATS_VERSION, {"model": model_key, "calib": calib_key}, {})
    # realise.mode may list several realisers: each is resolved as if it were the only one (so its keys are those
    # of a config naming it alone), and every CAP allocation is spent by each
    realise_cfg = dict(config.get("realise") or {})
    modes = realise_cfg.get("mode", realise.DEFAULTS["mode"])
    modes = list(dict.fromkeys(modes)) if isinstance(modes, list) else [modes]
    if not modes:
        raise GlrsError("config key realise.mode: an empty list; name at least one realiser")
    realise_modes = {m: realise.resolve_params(realise_cfg | {"mode": m}) for m in modes}
    realise_params = realise_modes[modes[0]]
    runs, excluded = [], []
    nm = realise.nm_of(realise_params)
    cap_densities = list(config["target_density"])
    for method in config["methods"]:
        if method != "cap":
            runs += _baseline_runs(config, method, model_key, calib_key, layers, source.num_layers, excluded)
            continue
        if nm is not None:  # the N:M realisation needs the N:M floor in every matrix
            frac = nm[0] / nm[1]
            cap_densities = _feasible(cap_densities, lambda d: "" if d >= frac - 1e-12 else
                                      f"realise.sparsity {realise_params['sparsity']} needs density >= {frac:g}",
                                      "cap", excluded)
        for allocator in config["allocators"]:
            params = dict(config.get("allocator_params", {}).get(allocator, {}))
            inputs = {"stage1": stage1_key, "layers": ",".join(map(str, layers))}
            if allocator in allocate.NEEDS_CALIBRATION:
                # Hash the effective settings, defaults included, so a changed default is a new key.
                params = cap.resolve_params(params, allocator)
                inputs |= {"calib": calib_key, "cap_version": str(cap.CAP_VERSION)}
            if allocate.needs_stats(allocator, params):
                inputs |= {"stats": stats_key}
            for density in cap_densities:
                alloc_key = cas.key_of("alloc", allocate.ALLOC_VERSION, inputs,
                                       {"allocator": allocator, "density": density, "params": params, "seed": config["seed"]})
                for mode, rp in realise_modes.items():
                    realise_key = ""
                    comp_inputs = {"model": model_key, "alloc": alloc_key}
                    if mode != "select":  # refit, wanda, sparsegpt: per-layer realise jobs
                        realise_key = cas.key_of("realise", realise.REALISE_VERSION,
                                                 {"model": model_key, "alloc": alloc_key, "stats": stats_key}, rp)
                        comp_inputs |= {"realise": realise_key}
                    comp_key = cas.key_of("materialise", compressed.MATERIALISE_VERSION, comp_inputs,
                                          {"export": config.get("export", "none")})
                    runs.append(Run(method, allocator, density, alloc_key, comp_key, params, realise_key, mode))

    ev = config["evaluation"]

    def ppl_keys(role: str) -> dict[str, str]:  # one protocol; the text of the role tells the keys apart
        return {ds: cas.key_of("ppl", evaluate.EVAL_VERSION, {"text": data.text_identity(ds, role)},
                               {"seqlen": ev["seqlen"], "max_tokens": ev.get("max_tokens"), "dtype": config["dtype"]})
                for ds in ev["datasets"]}

    return Plan(config, source, model_key, layers, stage1_key, rpca_params, calib_key, calib_params, runs,
                ppl_keys("evaluation"), _zeroshot_key(config), stats_key, realise_params, excluded, realise_modes,
                ppl_keys("validation") if ev.get("validation") else {})


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "absent"


def _zeroshot_key(config: dict) -> str:
    """Key of the zero-shot records: the task list, limit, seed, dtype, lm-eval's version and, for the
    offline tasks, a cheap stand-in for build_offline_tasks' fingerprint (the held-out text's hash, the
    task generator's version and the examples per task, which together determine the task files)."""
    zs = config["evaluation"].get("zeroshot", {})
    tasks = list(zs.get("tasks", []))
    if not tasks:
        return ""
    from . import zeroshot

    offline = [t for t in tasks if t in zeroshot.OFFLINE_TASKS]
    tasks_fp = {"text": data.text_identity("pydoc", "evaluation"), "generator": zeroshot.TASKGEN_VERSION,
                "n": zeroshot.DEFAULT_N} if offline else None
    return cas.key_of("zeroshot", zeroshot.ZEROSHOT_VERSION, {"offline_tasks": cas.key_of("tasks", 1, {}, tasks_fp or {})},
                      {"tasks": tasks, "limit": zs.get("limit"), "seed": config["seed"], "dtype": config["dtype"],
                       "lm_eval": _lm_eval_version()})
