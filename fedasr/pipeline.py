"""The staged pipeline behind ``fedasr demo`` and the Common Voice recipes.

synth -> prepare -> partition (cross-silo + cross-device) -> warmup -> central -> cross-silo -> cross-device
-> compare. Settings come from a pipeline YAML (hparams/pipeline/demo.yaml for the demo, commonvoice.yaml for a
real language) plus ``--set key.sub=value`` overrides. Each stage, once finished, writes a done-marker
(``<out>/.done.<stage>.json``) holding its fingerprint: its settings and the fingerprint of the stage before, so
a re-run skips finished stages and redoes a stage (and those after it) whose settings changed. Interrupted
training stages resume from their own checkpoints (train-central's Checkpointer, federate's --resume).

Layout of ``<out>``: ``corpus/`` (synth only), ``manifests/``, ``partitions/{cross-silo,cross-device}/``,
``runs/<dataset>/<language>/<setting>/<model>/seed<seed>/`` (fedasr.experiment), ``report/`` (compare),
``stages.json`` (seconds per stage).

The centralized baseline trains from scratch on all training speakers (warm-up speakers included), as the
reference does; the federated runs start from the warm-up seed. The centralized training depends on no other
training, so where the CPU has the cores (``central_beside_warmup``) it runs in a child process from the warm-up's
start until compare needs it (output in ``logs/central.log``), beside the warm-up and the federated stages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from fedasr.fl.metrics_log import METRICS_FILE, read_metrics_rows
from fedasr.fl.run_folder import RESOLVED_CONFIG_FILE
from fedasr.experiment import RunId, run_dir, save_run_config
from fedasr.utils.settings import check_settings, deep_merge, parse_dotted_overrides, schema_from_signature
from fedasr.utils.io import atomic_write_json, atomic_write_text, is_done, mark_done, read_json
from fedasr.utils.preflight import check_writable

REPO_ROOT = Path(__file__).resolve().parents[1]
# The recipes' YAMLs: hparams/ of the checkout, or the copy an installed wheel carries as package data (setup.py).
HPARAMS_ROOT = next((p for p in (REPO_ROOT / "hparams", Path(__file__).resolve().parent / "hparams") if p.is_dir()),
                    REPO_ROOT / "hparams")
DEFAULT_CONFIG = HPARAMS_ROOT / "pipeline" / "demo.yaml"
STAGES = ("synth", "prepare", "partition", "warmup", "central", "cross-silo", "cross-device", "compare")
FL_MODES = ("cross-silo", "cross-device")


class PipelineError(ValueError):
    """A pipeline setting or state that stops the run; the message names the file/stage and the fix."""


class StageFailed(RuntimeError):
    """A stage's command failed; the message points at its log."""


# ---- settings ----------------------------------------------------------------------------------------------------

def parse_set_overrides(pairs: list[str] | None) -> dict:
    """``["partition.warmup_speakers=4", "model=ctc_tiny"]`` -> nested dict (values parsed as YAML scalars)."""
    try:
        return parse_dotted_overrides(pairs, example="--set cross_silo.set.rounds=2")
    except ValueError as err:
        raise PipelineError(str(err)) from None


def load_pipeline_config(path: str | os.PathLike = DEFAULT_CONFIG, overrides: dict | None = None) -> dict:
    """The pipeline YAML with ``overrides`` applied, checked whole before any stage runs.

    Every stage reads its settings only when it starts, so a typo in the cross-device section would otherwise
    surface hours in: keys, types, the experiment and model YAMLs, the fl hparams and the report profile are all
    checked here, each error naming the file (or the --set overrides), the key and the valid keys.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: pipeline config not found; use hparams/pipeline/demo.yaml or commonvoice.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({err}); compare it with hparams/pipeline/demo.yaml") from None
    source = f"{path} (with the --set overrides)" if overrides else str(path)
    check_pipeline_settings(overrides or {}, source="--set overrides", complete=False)
    if isinstance(config, dict):
        config = deep_merge(deep_merge(optional_defaults(), config), overrides or {})
    check_pipeline_settings(config, source=source)
    check_pipeline_references(config, source=source)
    return config


_FIX = "Every key is documented in hparams/pipeline/demo.yaml."
_FL_SECTION = {"hparams": str, "set": (dict, type(None))}
_PIPELINE_SCHEMA = {
    "dataset": str, "language": str, "model": str, "seed": int, "threads": int, "device": str, "precision": str,
    "central_beside_warmup": (bool, str), "central_device": (str, type(None)), "corpus": dict, "prepare": dict,
    "partition": {"warmup_speakers": int, "cross_silo_clients": int, "cross_device_clients": (int, type(None)),
                  "min_utterances": int, "valid_fraction": float, "seed": int,
                  "silo_sizes": str, "size_exponent": (int, float), "skew": str, "skew_share": (int, float)},
    "experiment": str, "warmup": dict, "central": dict, "cross_silo": dict, "cross_device": dict,
    "evaluation": {"decoding": str}, "compare": dict,
}


def optional_defaults() -> dict:
    """Keys a pipeline file written before they existed may lack, with their defaults (the silo layout's are
    partition_manifest's own): such a file keeps working, and behaves as it did."""
    import inspect

    from fedasr.data.partition import partition_manifest

    parameters = inspect.signature(partition_manifest).parameters
    return {"device": "auto", "precision": "fp32", "central_beside_warmup": "auto", "central_device": None,
            "partition": {key: parameters[key].default for key in SILO_LAYOUT_KEYS}}


DECODINGS = ("beam", "greedy")
SILO_LAYOUT_KEYS = ("silo_sizes", "size_exponent", "skew", "skew_share")  # partition keys of cross-silo only


def check_pipeline_settings(config: dict, *, source: str, complete: bool = True) -> None:
    """Keys and value types of a pipeline config (``complete=False``: a partial one, e.g. the --set overrides).

    ``corpus``, ``prepare`` and ``compare`` hold keyword options of the function their stage calls, so their
    valid keys are read from that function's signature (optional keys: the function has defaults)."""
    from fedasr.data.commonvoice import prepare_common_voice
    from fedasr.data.partition import PartitionError, check_non_iid
    from fedasr.data.synth import synthesize_corpus
    from fedasr.report.compare import compare_runs

    check_settings(config, _PIPELINE_SCHEMA, source=source, complete=complete, fix=_FIX, error=PipelineError)
    optional_sections = {"corpus": schema_from_signature(synthesize_corpus, skip=("lang",)),
                         "prepare": schema_from_signature(prepare_common_voice, skip=("lang",)),
                         "compare": schema_from_signature(compare_runs),
                         "cross_silo": _FL_SECTION, "cross_device": _FL_SECTION}
    for name, schema in optional_sections.items():
        if name in config:
            check_settings(config[name], schema, source=source, section=f"{name}.", complete=False, fix=_FIX,
                           error=PipelineError)
    for name in ("cross_silo", "cross_device"):
        if complete and "hparams" not in config[name]:
            raise PipelineError(f"{source}: missing key {name}.hparams (the fl hparams file, e.g. "
                                f"hparams/fl/{name}.yaml). {_FIX}")
    if "threads" in config and config["threads"] < 1:
        raise PipelineError(f"{source}: threads must be >= 1, got {config['threads']}. {_FIX}")
    beside = config.get("central_beside_warmup", "auto")
    if beside not in (True, False, "auto"):
        raise PipelineError(f"{source}: central_beside_warmup must be auto, true or false, got {beside!r}. {_FIX}")
    if beside is True and central_starts_from_warmup(config):
        raise PipelineError(f"{source}: central_beside_warmup is true but central.init_from is warmup: the centralized "
                            "run then needs the warm-up's model. Set central_beside_warmup to auto or false.")
    silo_layout = {key: (config.get("partition") or {}).get(key) for key in SILO_LAYOUT_KEYS}
    if complete:  # values the partition stage would refuse hours in, after warm-up and central training
        try:
            check_non_iid("cross-silo", **silo_layout)
        except PartitionError as exc:
            raise PipelineError(f"{source}: partition.{exc} {_FIX}") from None
    if complete:  # a device this machine cannot give: refused before the first stage, not at the warm-up
        from fedasr.utils.device import DeviceError, check_precision, resolve_device
        try:
            check_precision(config["precision"], resolve_device(config["device"], what="device"))
            check_central_device(config)
        except DeviceError as err:
            raise PipelineError(f"{source}: {err}") from None
    decoding = (config.get("evaluation") or {}).get("decoding")
    if decoding is not None and decoding not in DECODINGS:
        raise PipelineError(f"{source}: evaluation.decoding must be one of {DECODINGS}, got {decoding!r}. {_FIX}")


def check_pipeline_references(config: dict, *, source: str) -> None:
    """What the pipeline config points at: the experiment and model YAMLs (and the keys ``warmup`` / ``central``
    override in them), the fl hparams with their ``set`` overrides, the report's device profile and grid."""
    from fedasr.fl.simulation import check_simulation_devices, ray_address
    from fedasr.models.hparams import compose_yaml, override_schema
    from fedasr.report.energy import device_profile, grid_intensity
    from fedasr.utils.device import DeviceError

    try:
        experiment = experiment_file(config)
    except (KeyError, IndexError, ValueError) as err:
        raise PipelineError(f"{source}: experiment {config['experiment']!r} cannot be filled in ({err!r}); the only "
                            "placeholder is {language}, e.g. hparams/CommonVoice/{language}.yaml") from None
    if not experiment.is_file():
        known = sorted(p.name for p in experiment.parent.glob("*.yaml"))
        raise PipelineError(f"{source}: experiment {str(experiment)!r} (key `experiment`, language "
                            f"{config['language']!r}) not found; files there: {known}")
    try:
        text, _ = compose_yaml(experiment, str(config["model"]))
    except ValueError as err:
        raise PipelineError(f"{source}: key `model` or `experiment`: {err}") from None
    experiment_keys = override_schema(text)
    for name in ("warmup", "central"):
        fix = f"`{name}` overrides keys of the experiment {experiment.name} and its model {config['model']}."
        check_settings(config[name], experiment_keys, source=source, section=f"{name}.", complete=False, fix=fix,
                       error=PipelineError)
    for name in ("cross_silo", "cross_device"):
        try:  # every key and value, strategy settings included (a trial build), and the devices it asks for
            fl = fl_settings(config, name)[0]
            check_simulation_devices(fl, source=f"{name}.hparams")
        except (ValueError, DeviceError) as err:
            raise PipelineError(f"{source}: {name}.hparams / {name}.set: {err}") from None
        if config.get("central_device") and ray_address(fl) is not None:
            raise PipelineError(f"{source}: central_device {config['central_device']!r} with {name} on the Ray "
                                f"cluster at {ray_address(fl)}: the pipeline can keep this machine's GPU from its "
                                "own stages, not from the cluster's workers. Set central_device: null")
    try:
        device_profile(config["compare"].get("profile", "v100"))
        grid_intensity(config["compare"].get("grid", "france"))
    except ValueError as err:
        raise PipelineError(f"{source}: compare: {err}") from None


def repo_path(path: str) -> Path:
    """A config path: as given when it exists from the current folder, else one of the shipped YAMLs
    (``hparams/...``: the checkout's, or the installed package's), else relative to the repository."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    if candidate.parts[:1] == ("hparams",) and (HPARAMS_ROOT.joinpath(*candidate.parts[1:])).exists():
        return HPARAMS_ROOT.joinpath(*candidate.parts[1:])
    return REPO_ROOT / candidate


# ---- stage bookkeeping ---------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    settings: dict
    action: Callable[[], dict | None]
    # A stage independent of the ones around it may run in a child process: it starts with the stage named
    # ``beside`` and must have finished when the stage named ``needed_by`` starts (None: at its own turn).
    # ``in_child`` is what the child calls, with its echo (picklable: a module-level function or a partial of one).
    beside: str | None = None
    needed_by: str | None = None
    in_child: Callable[[Callable[[str], None]], None] | None = None


@dataclass
class Pipeline:
    out: Path
    stages: list[Stage]
    echo: Callable[[str], None] = print
    timings: dict = field(default_factory=dict)


def stage_range(start: str | None, stop: str | None, names: tuple[str, ...] = STAGES) -> list[str]:
    """The stage names from ``start`` to ``stop`` included (names or 1-based numbers)."""
    def index(value: str | None, default: int) -> int:
        if value is None:
            return default
        if str(value).isdigit() and 1 <= int(value) <= len(names):
            return int(value) - 1
        if value in names:
            return names.index(value)
        raise PipelineError(f"unknown stage {value!r}; stages are {', '.join(f'{i + 1}:{n}' for i, n in enumerate(names))}")

    first, last = index(start, 0), index(stop, len(names) - 1)
    if first > last:
        raise PipelineError(f"--stage {start} comes after --stop-stage {stop}")
    return list(names[first:last + 1])


def fingerprints(stages: list[Stage]) -> dict[str, dict]:
    """Each stage's fingerprint: its settings plus the fingerprint of the stage before (a chain)."""
    chain, previous = {}, None
    for stage in stages:
        chain[stage.name] = {"stage": stage.name, "settings": json.loads(json.dumps(stage.settings, default=str)),
                             "after": previous}
        previous = json.dumps(chain[stage.name], sort_keys=True)
    return chain


def run_stages(pipeline: Pipeline, start: str | None = None, stop: str | None = None) -> dict[str, str]:
    """Run the selected stages in order; a stage whose done-marker matches is skipped. Returns {stage: state}.

    A stage with ``beside`` starts, in a child process, when the stage it names starts (both selected and not done);
    it is waited for and marked done before the stage it is ``needed_by`` (else at its own turn) and before this
    returns. A failure stops the children still running: each resumes from its own checkpoints on the next run."""
    names = [s.name for s in pipeline.stages]
    selected = stage_range(start, stop, tuple(names))
    prints = fingerprints(pipeline.stages)
    for name in names[:names.index(selected[0])]:
        if not is_done(pipeline.out, name, prints[name]):
            raise PipelineError(f"stage {name!r} is not done (or its settings changed) in {pipeline.out}: "
                                f"start from it (--stage {name}) before running {selected[0]!r}")
    states = {}
    timings_file = pipeline.out / "stages.json"
    timings = read_json(timings_file) if timings_file.exists() else {}
    labels = {s.name: f"[{number}/{len(names)}] {s.name}" for number, s in enumerate(pipeline.stages, start=1)}
    pending = {name for name in selected if not is_done(pipeline.out, name, prints[name])}
    children: dict[str, ChildStage] = {}

    def finished(stage: Stage, seconds: float, where: str = "") -> None:
        mark_done(pipeline.out, stage.name, prints[stage.name])
        timings[stage.name] = round(seconds, 1)
        atomic_write_json(timings_file, timings)
        pipeline.echo(f"== {labels[stage.name]}: finished in {seconds:.1f} s{where}")
        states[stage.name] = "ran"

    def wait_for(child: ChildStage) -> None:
        del children[child.stage.name]
        finished(child.stage, child.finish(pipeline.echo), f" (ran beside {child.stage.beside})")

    try:
        for stage in pipeline.stages:
            if stage.name not in selected:
                continue
            for child in [c for c in children.values() if c.stage.needed_by == stage.name or c.failed()]:
                wait_for(child)  # a failed child stops the pipeline at the next stage, not at compare
            if stage.name not in pending:
                pipeline.echo(f"== {labels[stage.name]}: done before, skipped")
                states[stage.name] = "skipped"
            elif stage.name in children:
                if stage.needed_by is None:
                    wait_for(children[stage.name])
                else:
                    pipeline.echo(f"== {labels[stage.name]}: still running beside the next stages (needed by "
                                  f"{stage.needed_by}; log: {children[stage.name].log})")
            else:
                pipeline.echo(f"== {labels[stage.name]}: running")
                for partner in (s for s in pipeline.stages if s.name in pending and s.beside == stage.name):
                    children[partner.name] = ChildStage(partner, pipeline.out)
                    pipeline.echo(f"== {partner.name}: running beside {stage.name} (log: {children[partner.name].log})")
                started = time.perf_counter()
                stage.action()
                finished(stage, time.perf_counter() - started)
        for child in list(children.values()):
            wait_for(child)
    finally:
        for child in children.values():
            child.stop()
    return states


class ChildStage:
    """A stage running in a child process, its output in ``<out>/logs/<stage>.log``, its echoed lines relayed when
    it is waited for."""

    def __init__(self, stage: Stage, out: Path) -> None:
        self.stage = stage
        self.log = out / "logs" / f"{stage.name}.log"
        self.echoed = self.log.with_suffix(".echo")  # the lines it echoes, relayed when it is waited for
        self.seconds = self.log.with_suffix(".seconds")  # how long it ran (it may be waited for much later)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.echoed.write_text("", encoding="utf-8")
        self.seconds.unlink(missing_ok=True)
        self.process = multiprocessing.get_context("spawn").Process(
            target=_run_child_stage, args=(stage.in_child, str(self.log), str(self.echoed), str(self.seconds)),
            name=f"fedasr-{stage.name}")  # spawn: nothing of this process's torch or Ray state is shared
        self.process.start()

    def finish(self, echo: Callable[[str], None]) -> float:
        """Wait for the child; its echoed lines, then its seconds; StageFailed (with the log's tail) if it failed."""
        self.process.join()
        for line in self.echoed.read_text(encoding="utf-8").splitlines():
            echo(line)
        if self.process.exitcode != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:] if self.log.exists() else ""
            raise StageFailed(f"{self.stage.name} (run beside another stage) exited with {self.process.exitcode}; "
                              f"log {self.log}:\n{tail}")
        return float(self.seconds.read_text(encoding="utf-8"))

    def failed(self) -> bool:
        return self.process.exitcode not in (None, 0)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _run_child_stage(action: Callable[[Callable[[str], None]], None], log: str, echoed: str, seconds: str) -> None:
    """In the child process: stdout, stderr and INFO logging into ``log``; ``action(echo)``, its duration into
    ``seconds``."""
    from fedasr.cli import configure_logging

    with open(log, "a", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    configure_logging()

    def echo(line: str) -> None:
        print(line, flush=True)
        with open(echoed, "a", encoding="utf-8") as relay:
            relay.write(line + "\n")

    started = time.perf_counter()
    action(echo)
    atomic_write_text(Path(seconds), f"{time.perf_counter() - started:.3f}")


# ---- the stages --------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Paths of one pipeline output folder."""

    out: Path
    config: dict
    corpus: Path | None = None

    @property
    def corpus_dir(self) -> Path:
        return self.corpus if self.corpus is not None else self.out / "corpus"

    @property
    def manifests(self) -> Path:
        return self.out / "manifests"

    def partition(self, mode: str) -> Path:
        return self.out / "partitions" / mode

    def run(self, setting: str) -> Path:
        return run_dir(self.out / "runs", self.run_id(setting))

    def run_id(self, setting: str) -> RunId:
        c = self.config
        return RunId(str(c["dataset"]), str(c["language"]), setting, str(c["model"]), int(c["seed"]))

    @property
    def report(self) -> Path:
        return self.out / "report"


def do_synth(layout: Layout, echo) -> None:
    from fedasr.data.synth import synthesize_corpus

    corpus = layout.config["corpus"]
    summary = synthesize_corpus(layout.corpus_dir, lang=layout.config["language"], **corpus)
    echo(f"   {summary['clips']} clips, {summary['hours']:.2f} h -> {layout.corpus_dir}")


def do_prepare(layout: Layout, echo) -> None:
    from fedasr.data.commonvoice import prepare_common_voice, report_table

    report = prepare_common_voice(layout.corpus_dir, layout.manifests, lang=layout.config["language"],
                                  **layout.config["prepare"])
    echo(report_table(report))


def do_partition(layout: Layout, echo) -> None:
    from fedasr.data.partition import partition_manifest

    p = layout.config["partition"]
    for mode in FL_MODES:
        clients = p["cross_silo_clients"] if mode == "cross-silo" else p["cross_device_clients"]
        silo_layout = {key: p[key] for key in SILO_LAYOUT_KEYS} if mode == "cross-silo" else {}  # device: 1 speaker
        result = partition_manifest(layout.manifests, layout.partition(mode), mode=mode, clients=clients,
                                    warmup_speakers=int(p["warmup_speakers"]), min_utterances=int(p["min_utterances"]),
                                    valid_fraction=float(p["valid_fraction"]), seed=int(p["seed"]), **silo_layout)
        echo(f"-- {mode}\n{result['summary_table']}")


def experiment_file(config: dict) -> Path:
    return repo_path(str(config["experiment"]).format(language=config["language"]))


def do_train_central(layout: Layout, setting: str, echo) -> None:
    """warmup: the warm-up speakers only; central: every training speaker. Both from scratch, unless the central
    section sets ``init_from`` (``warmup``: the warm-up's seed checkpoint, the federated runs' start)."""
    import torch

    from fedasr.models.train import train_central

    torch.set_num_threads(int(layout.config["threads"]))  # more threads than free cores multiplies the time
    out = layout.run(setting)
    overrides = training_overrides(layout, setting)
    claim_training_folder(out, setting, training_key(layout, setting, overrides))
    result = train_central(experiment_file(layout.config), overrides, device=stage_device(layout.config, setting),
                           run_opts={"precision": layout.config["precision"]})
    save_run_config(out, layout.run_id(setting), (out / "hyperparams.yaml").read_text(encoding="utf-8"))
    echo(f"   {setting}: {result['epochs']} epochs, dev WER {100 * result['dev_wer']:.2f} %, "
         f"test WER {100 * result['test_wer']:.2f} %, {result['seconds']} s -> {out}")
    evaluate_run_model(layout, setting)


def stage_device(config: dict, setting: str) -> str:
    """The device a stage trains and decodes on: ``central_device`` for the centralized baseline when set, else
    ``device``."""
    return (config.get("central_device") if setting == "central" else None) or config["device"]


def training_overrides(layout: Layout, setting: str) -> dict:
    """The experiment overrides of the warm-up or the centralized run: its section of the pipeline YAML, the
    manifests, its output folder, model and seed; the warm-up trains on the warm-up speakers only."""
    overrides = {"manifest_folder": str(layout.manifests), "output_folder": str(layout.run(setting)),
                 "model": layout.config["model"], "seed": int(layout.config["seed"]),
                 **layout.config["warmup" if setting == "warmup" else "central"]}
    if setting == "warmup":
        overrides["train_csv"] = str(layout.partition("cross-silo") / "warmup" / "train.csv")
    elif central_starts_from_warmup(layout.config):  # where the federated runs start
        overrides["init_from"] = str(layout.run("warmup") / "seed_checkpoint")
    return overrides


TRAINING_KEY_FILE = "pipeline_training.json"


def training_key(layout: Layout, setting: str, overrides: dict) -> dict:
    """What a warm-up or centralized run was trained from: the pipeline's settings for it and a digest of each input:
    the experiment YAML as composed with its model YAML and the files it extends, the train/dev/test manifests, the
    start checkpoint. Paths are left out, so a copied pipeline folder keeps its key."""
    from fedasr.models.hparams import compose_yaml

    inputs = {"train": Path(overrides.get("train_csv") or layout.manifests / "train.csv"),
              "dev": layout.manifests / "dev.csv", "test": layout.manifests / "test.csv"}
    if overrides.get("init_from"):
        inputs["init_from"] = Path(overrides["init_from"])
    composed, _ = compose_yaml(experiment_file(layout.config), model=str(overrides["model"]))
    settings = {k: v for k, v in overrides.items() if k not in ("manifest_folder", "output_folder", "train_csv",
                                                                "init_from")}
    return {"setting": setting, "settings": json.loads(json.dumps(settings, default=str)),
            "inputs": {"experiment": hashlib.sha256(composed.encode()).hexdigest(),
                       **{name: content_digest(path) for name, path in inputs.items()}}}


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def trained_from_current_inputs(layout: Layout, setting: str) -> bool:
    """Whether the warm-up or centralized run in ``layout`` was trained from what the pipeline would train it from
    now (its recorded :func:`training_key`); the data stages must have run."""
    recorded = layout.run(setting) / TRAINING_KEY_FILE
    return recorded.exists() and read_json(recorded) == training_key(layout, setting, training_overrides(layout, setting))


def claim_training_folder(out: Path, setting: str, key: dict) -> None:
    """Record what a training stage's folder is trained from, or refuse a folder trained from something else.

    SpeechBrain resumes whatever checkpoints an output folder holds; a pipeline stage whose settings changed
    (e.g. fewer warm-up epochs) would otherwise continue, or silently keep, the run made with the old ones. A folder
    with the same key resumes (an interrupted run, or a copy of a finished one); a run of an earlier fedasr without a
    key resumes if it did not finish."""
    recorded = out / TRAINING_KEY_FILE
    if recorded.exists():
        if read_json(recorded) == key:
            return
    elif not (out / "result.json").exists():
        atomic_write_json(recorded, key)  # a fresh folder, or an interrupted run of an earlier version
        return
    raise PipelineError(
        f"{out}: holds a {setting} run trained with other settings or inputs than this pipeline asks for now "
        f"({recorded.name if recorded.exists() else 'result.json'} there). Delete that folder to train the "
        f"{setting} model again with the new settings, or run the pipeline into another folder."
    )


def central_starts_from_warmup(config: dict) -> bool:
    """Whether the centralized run starts where the federated runs start (``central.init_from: warmup``, the
    warm-up's seed checkpoint) instead of from scratch."""
    return (config.get("central") or {}).get("init_from") == "warmup"


def central_beside_warmup(config: dict) -> bool:
    """Whether the centralized baseline trains beside the warm-up and the federated stages (setting
    ``central_beside_warmup``): never when it starts from the warm-up's model; ``auto``: when it has a GPU of its
    own (``central_device``), or on the CPU when the cores hold two trainings (2 x ``threads``)."""
    from fedasr.utils.device import resolve_device, usable_cores

    choice = config["central_beside_warmup"]
    if central_starts_from_warmup(config) or choice is False:
        return False
    if choice is True or config.get("central_device"):
        return True
    return resolve_device(config["device"]) == "cpu" and usable_cores() >= 2 * int(config["threads"])


def check_central_device(config: dict) -> None:
    """``central_device`` (a GPU of the centralized baseline's own, beside the other stages), or DeviceError: it
    must be ``cuda:N``, visible, other than the GPU of ``device``, with a GPU left for the other stages, and the
    baseline must be able to train beside them."""
    from fedasr.utils.device import DeviceError, parse_device, resolve_device, visible_gpus

    request = config.get("central_device")
    if not request:
        return
    kind, index = parse_device(request, what="central_device")
    if kind != "cuda" or index is None:
        raise DeviceError(f"central_device must name a GPU (cuda:N) the centralized baseline trains on beside the "
                          f"other stages, got {request!r}; null: the pipeline's device")
    central = resolve_device(request, what="central_device")
    if visible_gpus() < 2:
        raise DeviceError(f"central_device {request!r} needs 2 GPUs or more (one for the baseline, the others for "
                          f"the other stages); this machine has {visible_gpus()}: set central_device: null")
    asked = {"device": config["device"]}
    asked.update({f"{name}.set.device": ((config.get(name) or {}).get("set") or {}).get("device")
                  for name in ("cross_silo", "cross_device")})
    for key, device in asked.items():
        if device is None:
            continue
        other = resolve_device(device, what=key)
        if not other.startswith("cuda") or other == central:
            raise DeviceError(f"central_device {request!r} must be a GPU other than the other stages' ({key} "
                              f"{device!r} -> {other}): e.g. device: cuda (GPU 0) and central_device: "
                              f"cuda:{visible_gpus() - 1}")
    if config["central_beside_warmup"] is False or central_starts_from_warmup(config):
        raise DeviceError(f"central_device {request!r} trains the baseline beside the other stages, but "
                          + ("central_beside_warmup is false" if config["central_beside_warmup"] is False
                             else "central.init_from is warmup (it needs the warm-up's model first)")
                          + ": set central_device: null, or let it run beside")


def federated_device(config: dict, device: str) -> str:
    """``device`` (the pipeline's, or a federated section's own) as a federated stage names it: without the
    centralized baseline's GPU in its CUDA_VISIBLE_DEVICES (:func:`gpus_without_central`), ``cuda:N`` past that
    GPU is ``cuda:N-1`` there."""
    from fedasr.utils.device import parse_device

    kind, index = parse_device(device)
    if not config.get("central_device") or kind != "cuda" or index is None:
        return device
    return f"cuda:{index - (index > parse_device(config['central_device'])[1])}"


def gpus_without_central(config: dict) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries of every GPU but ``central_device``'s (the other stages' GPUs, so Ray
    places no client on the baseline's GPU); None when the baseline has no GPU of its own. An entry is what
    CUDA_VISIBLE_DEVICES already holds (an index or a UUID), else the GPU's index."""
    from fedasr.utils.device import parse_device, visible_gpus

    if not config.get("central_device"):
        return None
    index = parse_device(config["central_device"])[1]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = ([e.strip() for e in visible.split(",")] if visible is not None
               else [str(i) for i in range(visible_gpus())])[:visible_gpus()]  # CUDA uses the valid ones only
    return [entry for position, entry in enumerate(entries) if position != index]


def central_alongside(central_training: Callable[[Callable[[str], None]], None], config: dict) -> dict:
    """The central Stage's fields that run ``central_training`` in a child process from the warm-up's start until
    compare needs it (none when it runs in its turn)."""
    if not central_beside_warmup(config):
        return {}
    return {"beside": "warmup", "needed_by": "compare", "in_child": central_training}


def fit_to_partition(config, num_clients: int) -> tuple[dict, list[str]]:
    """Overrides that fit the fl settings to a partition with fewer clients than they assume, and a note for each:
    the recipe's defaults (e.g. 20 speaker-clients per round) then serve a small corpus too."""
    if config.clients_per_round is not None and int(config.clients_per_round) > num_clients:
        return {"clients_per_round": num_clients}, [
            f"clients_per_round {config.clients_per_round} -> {num_clients} (the partition holds {num_clients} clients)"]
    return {}, []


FL_SETTINGS_FILE = "fl_settings.yaml"  # a federated stage's settings, resolved once by the pipeline


def federate_command(layout: Layout, mode: str) -> list[str]:
    """The `fedasr federate` command of a stage: its resolved settings file (:func:`write_fl_settings`), no overrides."""
    from fedasr.fl.checkpoint import checkpoint_path

    out = layout.run(mode)
    command = [sys.executable, "-m", "fedasr.cli", "federate", str(out / FL_SETTINGS_FILE), "--mode", mode,
               "--partition", str(layout.partition(mode)),
               "--seed-checkpoint", str(layout.run("warmup") / "seed_checkpoint"), "--output-dir", str(out),
               "--dev", str(layout.manifests / "dev.csv"), "--test", str(layout.manifests / "test.csv")]
    if checkpoint_path(out).exists():
        command.append("--resume")  # an interrupted run continues from its last complete round
    return command


def fl_settings(config: dict, name: str, fitted: dict | None = None, num_clients: int | None = None):
    """The FLConfig of a federated section (``cross_silo`` / ``cross_device``): its hparams file, the pipeline's
    device, precision and seed, then the section's ``set`` (which wins), fitted to the devices (and ``fitted``:
    overrides that fit it to the partition of ``num_clients`` clients, when known); and the notes of what was
    fitted."""
    from fedasr.fl.config import load_fl_config

    section = config[name]
    explicit = section.get("set") or {}
    overrides = deep_merge({"device": config["device"], "precision": config["precision"]}, explicit)
    overrides["device"] = federated_device(config, overrides["device"])  # as its CUDA_VISIBLE_DEVICES numbers it
    overrides = deep_merge(overrides, {"seed": int(config["seed"]), **(fitted or {})})
    fl_config = load_fl_config(repo_path(section["hparams"]), overrides)
    others = gpus_without_central(config)
    for_devices, notes = fit_to_devices(fl_config, explicit, num_clients, None if others is None else len(others))
    if for_devices:
        fl_config = load_fl_config(repo_path(section["hparams"]), deep_merge(overrides, for_devices))
    return fl_config, notes


def fit_to_devices(config, explicit: dict, num_clients: int | None = None,
                   gpus: int | None = None) -> tuple[dict, list[str]]:
    """On a GPU (device auto or cuda) the simulated clients get a GPU share unless the section sets
    ``client_num_gpus`` itself: with the fl hparams' 0 they would train on the CPU while the GPU idles. The share
    is :func:`client_gpu_share` of the visible GPUs and the clients that can train at once (a round's clients,
    at most one per CPU Ray has for clients); ``gpus``: the GPUs the stage may use (default: all visible)."""
    from fedasr.fl.simulation import ray_address
    from fedasr.utils.device import resolve_device, visible_gpus

    if ("client_num_gpus" in explicit or float(config.client_num_gpus) > 0 or ray_address(config) is not None
            or not resolve_device(config.device).startswith("cuda")):
        return {}, []
    round_size = [int(n) for n in (config.clients_per_round, num_clients) if n is not None]  # unknown: none
    ray_slots = int((os.cpu_count() or 1) // float(config.client_num_cpus))
    gpus = visible_gpus() if gpus is None else gpus
    share = client_gpu_share(gpus, min(round_size + [ray_slots]) if round_size else None)
    per_gpu = round(1 / share)
    return {"client_num_gpus": share}, [
        f"client_num_gpus 0 -> {share:g} (device {config.device}, {gpus} GPU{'s' if gpus > 1 else ''}: up to "
        f"{per_gpu} client{'s' if per_gpu > 1 else ''} per GPU; set it in the section's `set` to change)"]


MAX_CLIENTS_PER_GPU = 4  # the most simulated clients the pipeline puts on one GPU (each holds a model, its
                         # gradients, optimizer state and activations)


def client_gpu_share(gpus: int, clients_at_once: int | None) -> float:
    """The ``client_num_gpus`` that spreads a round over the GPUs: 1 / k, k the fewest clients per GPU that lets
    every client of the round train at once (``ceil(clients / gpus)``, at most MAX_CLIENTS_PER_GPU; unknown
    clients: the most). Wherever Ray then places the shares, no GPU holds more than k: 10 silos on 8 GPUs get 0.5
    (two per GPU at most), where 0.25 could stack four silos on one GPU while others idle."""
    if not clients_at_once or gpus < 1:
        return round(1 / MAX_CLIENTS_PER_GPU, 4)
    per_gpu = min(MAX_CLIENTS_PER_GPU, -(-int(clients_at_once) // int(gpus)))
    return round(1 / per_gpu, 4)


def resolve_fl_settings(layout: Layout, mode: str):
    """The stage's FLConfig (:func:`fl_settings`) fitted to the partition and the devices; and the notes of what
    was fitted."""
    from fedasr.data.partition import load_partition

    name = mode.replace("-", "_")
    num_clients = len(load_partition(layout.partition(mode))["clients"])
    config, notes = fl_settings(layout.config, name, num_clients=num_clients)
    fitted, partition_notes = fit_to_partition(config, num_clients)
    if fitted:  # clients_per_round lowered to num_clients: the GPU share, fitted to both already, stays as it is
        config, notes = fl_settings(layout.config, name, fitted, num_clients)
    config.evaluation.test_seed = False  # the seed is the warm-up stage's model: its test WER is in that stage's result
    return config, notes + partition_notes + give_server_its_data(config, layout.partition(mode) / "warmup" / "train.csv")


def give_server_its_data(config, warmup_manifest: Path) -> list[str]:
    """server_training without a manifest trains on the warm-up speakers' train.csv (the data the server holds:
    the seed was trained on it and no client has it); a note when it is filled in."""
    if not config.server_training.epochs or config.server_training.manifest:
        return []
    config.server_training.manifest = str(warmup_manifest)
    return [f"server_training.manifest -> {warmup_manifest} (the warm-up speakers')"]


def write_fl_settings(out: Path, config) -> Path:
    """Every federated setting, resolved, in the hparams format `fedasr federate` reads (complete: no ``extends``)."""
    path = out / FL_SETTINGS_FILE
    atomic_write_text(path, "# Resolved by the pipeline from its YAML: the settings this stage ran with.\n"
                      + yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


class RoundWatcher(threading.Thread):
    """Prints each new line of a run's metrics.jsonl (one per round) while the run goes on."""

    def __init__(self, metrics: Path, label: str, rounds: int, echo) -> None:
        super().__init__(daemon=True)
        self.metrics, self.label, self.rounds, self.echo = metrics, label, rounds, echo
        self.stopped = threading.Event()
        self.seen = 0

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.poll()
        self.poll()

    def poll(self) -> None:
        try:
            rows = read_metrics_rows(self.metrics)
        except (OSError, ValueError):  # progress lines only: the run itself reports a damaged file
            return
        for row in rows[self.seen:]:
            took = row.get("seconds", {}).get("round")
            self.echo(f"   {self.label} round {row['round']}/{self.rounds}: dev WER {100 * row['dev_wer']:.2f} %"
                      + (f", lr {row['lr']:.3g}, {took:.1f} s" if took is not None else " (seed model)"))
        self.seen = max(self.seen, len(rows))


def do_federate(layout: Layout, mode: str, echo) -> None:
    out = layout.run(mode)
    out.mkdir(parents=True, exist_ok=True)
    config, notes = resolve_fl_settings(layout, mode)
    for note in notes:
        echo(f"   {mode}: {note}")
    write_fl_settings(out, config)
    command = federate_command(layout, mode)
    watcher = RoundWatcher(out / METRICS_FILE, mode, config.rounds, echo)
    watcher.start()
    log_path = out / "federate.log"
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                  env=federate_environment(layout.config))
    finally:
        watcher.stopped.set()
        watcher.join()
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise StageFailed(f"{mode}: `fedasr federate` exited with {done.returncode}; log {log_path}:\n{tail}")
    resolved = read_json(out / RESOLVED_CONFIG_FILE)
    save_run_config(out, layout.run_id(mode), resolved)
    evaluate_run_model(layout, mode)


def federate_environment(config: dict) -> dict:
    """The environment of a `fedasr federate` stage: this one, unbuffered, without the centralized baseline's GPU
    when it has one of its own (:func:`gpus_without_central`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    others = gpus_without_central(config)
    if others is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(others)
    return env


def evaluate_run_model(layout: Layout, setting: str) -> dict:
    """Per-utterance test decoding of a run's model (a federated run: its best model) ->
    ``<run>/eval/{hyps.tsv,wer_report.json,wer_report.txt}``: compare's per-speaker plots and intervals."""
    from fedasr.models.evaluate import evaluate_checkpoint

    out = layout.run(setting)
    model = out / "seed_checkpoint" if setting in ("warmup", "central") else out
    return evaluate_checkpoint(model, layout.manifests / "test.csv", decoding=layout.config["evaluation"]["decoding"],
                               out_dir=out / "eval", device=stage_device(layout.config, setting),
                               precision=layout.config["precision"])


def do_compare(layout: Layout, echo) -> None:
    from fedasr.report.compare import compare_runs

    runs = [layout.run(s) for s in ("warmup", "central", *FL_MODES)]
    summary = compare_runs(runs, layout.report, **layout.config["compare"])
    echo(summary["table"])


# ---- the entry point ---------------------------------------------------------------------------------------------

def build_pipeline(out: str | os.PathLike, config: dict, *, corpus: str | os.PathLike | None = None,
                   echo: Callable[[str], None] = print) -> Pipeline:
    """The stages of one pipeline run; ``corpus`` (a Common Voice folder) replaces the synth stage."""
    out = Path(out).resolve()
    if corpus is not None and not Path(corpus).is_dir():
        raise FileNotFoundError(f"{corpus}: Common Voice folder not found (it must hold clips/ and train/dev/test.tsv)")
    layout = Layout(out, config, Path(corpus).resolve() if corpus is not None else None)
    c = config
    central_training = functools.partial(do_train_central, layout, "central")  # picklable: it may run in a child
    stages = [
        Stage("synth", {"corpus": c["corpus"] if corpus is None else str(layout.corpus_dir), "language": c["language"]},
              (lambda: do_synth(layout, echo)) if corpus is None else (lambda: echo(f"   using {layout.corpus_dir}"))),
        Stage("prepare", {"prepare": c["prepare"]}, lambda: do_prepare(layout, echo)),
        Stage("partition", {"partition": c["partition"]}, lambda: do_partition(layout, echo)),
        Stage("warmup", {k: c[k] for k in ("experiment", "model", "seed", "precision", "warmup")},
              lambda: do_train_central(layout, "warmup", echo)),
        Stage("central", {k: c[k] for k in ("central", "precision", "evaluation")}, lambda: central_training(echo),
              **central_alongside(central_training, c)),
        Stage("cross-silo", {"fl": c["cross_silo"], "precision": c["precision"], "evaluation": c["evaluation"]},
              lambda: do_federate(layout, "cross-silo", echo)),
        Stage("cross-device", {"fl": c["cross_device"], "precision": c["precision"], "evaluation": c["evaluation"]},
              lambda: do_federate(layout, "cross-device", echo)),
        Stage("compare", {"compare": c["compare"]}, lambda: do_compare(layout, echo)),
    ]
    return Pipeline(out=out, stages=stages, echo=echo)


def run_pipeline(out: str | os.PathLike, *, config_file: str | os.PathLike = DEFAULT_CONFIG,
                 overrides: dict | None = None, corpus: str | os.PathLike | None = None, start: str | None = None,
                 stop: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the pipeline into ``out``; returns {"states", "report", "seconds"}.

    >>> run_pipeline("out", overrides={"cross_silo": {"set": {"rounds": 3}}}, stop="cross-silo")  # doctest: +SKIP
    >>> run_pipeline("cv_fr", config_file="hparams/pipeline/commonvoice.yaml", corpus="cv-corpus/fr")  # doctest: +SKIP
    """
    config = load_pipeline_config(config_file, overrides)
    pipeline = build_pipeline(out, config, corpus=corpus, echo=echo)
    check_writable(pipeline.out, what="pipeline folder")
    atomic_write_text(pipeline.out / "pipeline.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    started = time.perf_counter()
    states = run_stages(pipeline, start, stop)
    report = pipeline.out / "report"
    return {"states": states, "report": str(report), "seconds": round(time.perf_counter() - started, 1)}
