"""Plan the hours of the paper's table (issue 14): the full `recipes/CommonVoice/<lang>/run.sh` on 1 and on 8 GPUs.

    .venv/bin/python bench/full_table_plan.py                                   # published throughput, assumed hours
    .venv/bin/python bench/full_table_plan.py --from-smoke OUT/gpu_smoke.json   # figures bench/gpu_smoke.sh measured
    .venv/bin/python bench/full_table_plan.py --data results/CommonVoice_fr     # hours of a pipeline folder (stage 3)
    .venv/bin/python bench/full_table_plan.py --set cross_silo.set.rounds=10 --gpus 1 4 8 --out plan.md

The recipe's settings are read the way the pipeline reads them (fedasr.pipeline.load_pipeline_config with the
--set overrides, the experiment YAML composed with its model by fedasr.models.hparams.compose_yaml, the fl hparams
through fedasr.pipeline.fl_settings): epochs, rounds, local epochs, clients per round, warm-up speakers, silos,
speaker-clients, validation share, silo sizes. Only the data's hours and the GPU's speed come from outside.

Model of the time (each part is a line of the printed assumptions):
- GPU-hours = audio hours trained / throughput. Warm-up and central are one `fedasr train-central` process on one
  device (fedasr/models/train.py refuses SpeechBrain's data-parallel and distributed options), so their wall time
  is their GPU-hours on any number of GPUs.
- A federated round is simulated: Ray gives each client client_num_gpus of one GPU, so GPUs / client_num_gpus
  train at once (filling one GPU's slots before the next, as bench/ray_gpu_placement.py finds Ray and Flower do);
  the others wait for a free slot. A client
  spends a per-client overhead off the GPU (model transfer, data loader start-up), then computes; clients on one
  GPU share its speed (sharing adds no compute: two clients each train at about half speed). Rounds run in turn;
  the client_num_gpus of each row is the one with the shortest round (or the recipe's, when it sets one).
- The server's decoding (dev set every round / epoch, the per-client WER of wer-softmax, the final test) is counted
  only when a decoding throughput was measured (--from-smoke) and the dev/test manifests are known (--data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedasr.pipeline import (PipelineError, client_gpu_share, central_starts_from_warmup,  # noqa: E402
                             experiment_file, fl_settings, load_pipeline_config, parse_set_overrides, repo_path)

# SpeechBrain's LibriSpeech seq2seq CRDNN recipe (speechbrain/speechbrain, recipes/LibriSpeech/ASR/seq2seq/README.md,
# "Training Time"): "about 5 hours for each epoch on a NVIDIA V100 (32GB)", LibriSpeech 960 h.
PUBLISHED_RATE = 960 / 5  # 192 h of audio per hour of training = 192 audio-seconds per second (192x real time)
PUBLISHED_SOURCE = ("SpeechBrain's LibriSpeech seq2seq CRDNN recipe README (speechbrain/speechbrain, "
                    "recipes/LibriSpeech/ASR/seq2seq/README.md, 'Training Time': about 5 h per epoch of LibriSpeech "
                    "960 h on one NVIDIA V100 32GB): 960 h / 5 h = 192 audio-s/s (192x real time)")
PUBLISHED_DIFFERS = (
    "what differs from that figure: (1) the model: SpeechBrain's (train_BPE_1000.yaml) has 40 fbanks, 2 CNN blocks, "
    "4 x 1024 BiLSTM, 2 x 512 DNN, 1,000 tokens; fedasr's crdnn (hparams/models/crdnn.yaml) 80 fbanks, 3 CNN blocks, "
    "5 x 1024 BiLSTM, 2 x 1024 DNN, 500 tokens, 148 M parameters (bench/RESULTS.md, 0.74x real time on one CPU "
    "core): per second of audio about 1.25x the BiLSTM multiply-adds (5 layers against 4) and over 2x the CNN's (80 "
    "bins, 3 blocks, at 100 frames/s), some 1.8x in all by our count, so slower; (2) that recipe's train.py appends a "
    "corrupted copy of every batch when its hparams define env_corrupt (today's train_BPE_1000.yaml: Augmenter "
    "concat_original: True), so its network may see up to 2x the audio counted, and its 5 h include a dev-clean "
    "decode each epoch: fedasr faster per counted hour; (3) LibriSpeech utterances average ~12 s (960 h / 281k), "
    "Common Voice clips a few seconds (the recipe keeps <= 10 s): at batch 8 a GPU is fed less per step, so slower; "
    "(4) a V100 (2017) against today's A100/H100/H200: faster, by an unmeasured factor. Net: an order of magnitude, "
    "good to perhaps 2x either way; --from-smoke replaces it")
TRAIN_HOURS = 425.0  # issue 14's figure for Common Voice French train
DEFAULT_OVERHEAD_S = 15.0
SMOKE_SILO_SHARE, SMOKE_SPEAKER_SHARE = 0.5, 0.25  # bench/gpu_smoke.sh's SILO_GPUS / SPEAKER_GPUS
MODES = ("cross-silo", "cross-device")


class PlanError(ValueError):
    """An input the plan cannot use; the message names the file or option."""


# ---- the recipe's settings -------------------------------------------------------------------------------------

@dataclass
class Federated:
    name: str
    rounds: int
    local_epochs: int
    clients: int                   # clients of the partition (silos / speaker-clients)
    per_round: int                 # clients training each round
    client_num_gpus: float | None  # set by the recipe (fl hparams or its section's `set`), else None
    wer_source: str
    server_wer_utterances: int
    dev_max_utterances: int | None
    server_training_epochs: int


@dataclass
class Recipe:
    config_file: str
    language: str
    model: str
    experiment: str
    warmup_speakers: int
    valid_fraction: float
    silo_sizes: str
    size_exponent: float
    partition_seed: int
    epochs: dict                   # {"warmup": n, "central": n}
    central_from_warmup: bool
    experiment_dev_max: int | None
    fl: dict = field(default_factory=dict)  # mode -> Federated


def _plain(blocks: dict, key: str):
    return yaml.safe_load(blocks[key])[key] if key in blocks else None


def read_recipe(config_file: str, sets: list[str] | None, language: str) -> Recipe:
    """The pipeline YAML as `fedasr pipeline` loads it (checked whole), with the experiment and fl hparams it names."""
    from fedasr.models.hparams import compose_yaml, split_blocks

    from fedasr.fl.config import load_fl_config
    from fedasr.utils.settings import deep_merge

    overrides = parse_set_overrides(sets)
    overrides.setdefault("language", language)
    # The loader also checks that this machine has the devices asked for; the plan is for GPUs wherever it runs, so
    # it loads with CPU-safe device settings and takes the recipe's client_num_gpus (its `set`, else its fl hparams
    # file's) itself. Every other key is checked as `fedasr pipeline` checks it.
    cpu_safe = {"device": "auto", "precision": "fp32",
                **{name: {"set": {"client_num_gpus": 0, "device": "auto", "precision": "fp32"}}
                   for name in ("cross_silo", "cross_device")}}
    config = load_pipeline_config(repo_path(config_file), deep_merge(overrides, cpu_safe))
    experiment = experiment_file(config)
    blocks = split_blocks(compose_yaml(experiment, str(config["model"]))[0])
    epochs = {s: int(config[s].get("number_of_epochs", _plain(blocks, "number_of_epochs")))
              for s in ("warmup", "central")}
    p = config["partition"]
    recipe = Recipe(config_file=str(config_file), language=str(config["language"]), model=str(config["model"]),
                    experiment=str(experiment.relative_to(REPO) if experiment.is_relative_to(REPO) else experiment),
                    warmup_speakers=int(p["warmup_speakers"]), valid_fraction=float(p["valid_fraction"]),
                    silo_sizes=str(p["silo_sizes"]), size_exponent=float(p["size_exponent"]),
                    partition_seed=int(p["seed"]), epochs=epochs,
                    central_from_warmup=central_starts_from_warmup(config),
                    experiment_dev_max=config["central"].get("dev_max_utterances", _plain(blocks, "dev_max_utterances")))
    for mode in MODES:
        name = mode.replace("-", "_")
        fl, _ = fl_settings(config, name)
        clients = int(p["cross_silo_clients"] if mode == "cross-silo" else p["cross_device_clients"])
        explicit = ((overrides.get(name) or {}).get("set") or {}).get(
            "client_num_gpus", load_fl_config(repo_path(config[name]["hparams"])).client_num_gpus)
        recipe.fl[mode] = Federated(
            name=mode, rounds=int(fl.rounds), local_epochs=int(fl.local_epochs), clients=clients,
            per_round=min(clients, int(fl.clients_per_round)) if fl.clients_per_round is not None else clients,
            client_num_gpus=float(explicit) if explicit and float(explicit) > 0 else None, wer_source=fl.wer_source,
            server_wer_utterances=int(fl.evaluation.server_wer_utterances),
            dev_max_utterances=fl.evaluation.dev_max_utterances, server_training_epochs=int(fl.server_training.epochs))
    return recipe


# ---- the data's hours ------------------------------------------------------------------------------------------

@dataclass
class Data:
    train_h: float
    warmup_h: float
    silo_h: list                   # training slice of each silo
    speaker_h: float               # mean training slice of a speaker-client
    speaker_clients: int
    warmup_speakers: int
    dev_h: float | None = None
    dev_utterances: int | None = None
    test_h: float | None = None
    notes: list = field(default_factory=list)


def manifest_hours(path: Path) -> tuple[float, int]:
    """(hours, utterances) of a manifest, read by fedasr's own reader (its errors name the file and the line)."""
    from fedasr.data.manifest import ManifestError, read_manifest

    try:
        utterances = read_manifest(path)
    except ManifestError as err:
        raise PlanError(f"--data: {err} (--data needs a pipeline folder whose stage 3, partition, is done)") from None
    if not utterances:
        raise PlanError(f"{path}: the manifest is empty")
    return sum(u.duration for u in utterances) / 3600, len(utterances)


def data_from_folder(folder: Path) -> Data:
    """Hours of a pipeline folder after its partition stage: manifests/*.csv and partitions/*/partition.json."""
    from fedasr.data.partition import PartitionError, PartitionNotFoundError, load_partition

    try:
        silos, speakers = (load_partition(folder / "partitions" / mode) for mode in MODES)
    except (PartitionError, PartitionNotFoundError) as err:
        raise PlanError(f"--data {folder}: {err}") from None
    train_h, _ = manifest_hours(folder / "manifests" / "train.csv")
    dev_h, dev_n = manifest_hours(folder / "manifests" / "dev.csv")
    test_h, _ = manifest_hours(folder / "manifests" / "test.csv")
    client_h = [float(c["hours"]) for c in speakers["clients"]]
    return Data(train_h=train_h, warmup_h=float(silos["warmup"]["hours"]),
                silo_h=[float(c["hours"]) for c in silos["clients"]], speaker_h=sum(client_h) / len(client_h),
                speaker_clients=len(client_h), warmup_speakers=len(silos["warmup"]["speakers"]),
                dev_h=dev_h, dev_utterances=dev_n, test_h=test_h,
                notes=[f"hours: measured in {folder} (manifests/*.csv, partitions/*/partition.json): train {train_h:.1f} "
                       f"h, warm-up {float(silos['warmup']['hours']):.1f} h, {len(silos['clients'])} silos, "
                       f"{len(client_h)} speaker-clients (mean training slice {60 * sum(client_h) / len(client_h):.1f} "
                       f"min), dev {dev_h:.1f} h ({dev_n} utterances), test {test_h:.1f} h"])


def silo_shares(recipe: Recipe, silos: int) -> list[float]:
    from fedasr.data.partition import size_shares

    if recipe.silo_sizes == "skewed":  # the partition's own Zipf targets, in its seeded order
        return size_shares(silos, recipe.size_exponent, recipe.partition_seed)
    return [1 / silos] * silos


def assumed_data(recipe: Recipe, args) -> Data:
    """Hours from --train-hours and the speakers' counts: the warm-up speakers and the speaker-clients are seeded
    uniform choices of the training speakers (fedasr.data.partition), so on average they hold their share of the
    hours; --train-speakers defaults to the fewest the recipe's partition needs."""
    ws, device = recipe.warmup_speakers, recipe.fl["cross-device"].clients
    speakers = args.train_speakers or ws + device
    if speakers <= ws:
        raise PlanError(f"--train-speakers {speakers}: must exceed the {ws} warm-up speakers")
    train = args.train_hours
    warmup = args.warmup_hours if args.warmup_hours is not None else train * ws / speakers
    rest = train - warmup
    if train <= 0 or rest <= 0:
        raise PlanError(f"--train-hours {train:g} must be > 0 and exceed the warm-up's {warmup:g} h")
    device_total = args.device_hours if args.device_hours is not None else rest * min(1.0, device / (speakers - ws))
    keep = 1 - recipe.valid_fraction
    silos = recipe.fl["cross-silo"].clients
    source = "--train-hours" if args.train_hours != TRAIN_HOURS else "issue 14: Common Voice French train"
    notes = [f"train hours: {train:g} h ({source}; the Common Voice version decides it, --data reads it)"]
    if args.warmup_hours is None:
        notes.append(f"warm-up hours: {warmup:.1f} h = {train:g} h x {ws} / {speakers} speakers (assumption: the paper's "
                     "text available here does not state them; the warm-up speakers are a uniform seeded choice, so on "
                     f"average they hold their share of the hours; {speakers} = {ws} + {device} speaker-clients is the "
                     "fewest training speakers the recipe's partition needs, so this errs high; --train-speakers, "
                     "--warmup-hours or --data replace it)")
    if args.device_hours is None:
        notes.append(f"speaker-clients' hours: {device_total:.1f} h for {device} clients = the non-warm-up hours x "
                     f"min(1, {device} / {speakers - ws}) (assumption, same reasoning; CV's speaker sizes are very "
                     "unequal, so a round that samples a large speaker takes longer than this mean)")
    notes.append(f"clients train on {100 * keep:.0f} % of their hours (partition.valid_fraction {recipe.valid_fraction:g} "
                 f"held out); silos {recipe.silo_sizes}")
    return Data(train_h=train, warmup_h=warmup, silo_h=[rest * keep * s for s in silo_shares(recipe, silos)],
                speaker_h=device_total * keep / device, speaker_clients=device,
                warmup_speakers=ws, notes=notes)


# ---- the GPU's speed -------------------------------------------------------------------------------------------

@dataclass
class Rates:
    central: float                 # audio-s trained per s, one training process on a whole GPU
    federated: float               # the same for federated clients (a whole GPU's worth)
    overhead_s: float              # per client and round, outside its training
    greedy: float | None = None    # decoding audio-s per s
    beam: float | None = None
    notes: list = field(default_factory=list)


def _get(report: dict, dotted: str, path: Path):
    value = report
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise PlanError(f"{path}: no key {dotted!r}: not a report of bench/gpu_smoke_report.py "
                            "(bench/gpu_smoke.sh OUT_DIR writes OUT_DIR/gpu_smoke.json)")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or value in ("", None):
        raise PlanError(f"{path}: key {dotted!r} is {value!r}; bench/gpu_smoke.sh did not measure it")
    return value


def _share(report: dict, stage: str, default: float) -> float:
    """The client_num_gpus a smoke stage ran with (gpu_smoke.json records it), else gpu_smoke.sh's setting."""
    recorded = (report.get(stage) or {}).get("client_num_gpus")
    return float(recorded) if isinstance(recorded, (int, float)) and recorded > 0 else default


def smoke_rates(path: Path, model: str) -> Rates:
    """Figures of bench/gpu_smoke.sh's report (bench/gpu_smoke_report.py writes the JSON)."""
    if not path.is_file():
        raise PlanError(f"{path}: smoke report not found; run bench/gpu_smoke.sh OUT_DIR on a GPU machine, then "
                        "pass --from-smoke OUT_DIR/gpu_smoke.json")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PlanError(f"{path}: not a readable JSON report of bench/gpu_smoke_report.py ({err})") from None
    if not isinstance(report, dict):
        raise PlanError(f"{path}: not a report of bench/gpu_smoke_report.py (a JSON object was expected)")
    device, measured_model = str(_get(report, "central.device", path)), str(_get(report, "central.model", path))
    if not device.startswith("cuda"):
        raise PlanError(f"{path}: measured on {device!r} (a --cpu-dry-run?): the plan needs the figures of a GPU run")
    if measured_model != model:
        raise PlanError(f"{path}: measured with model {measured_model!r}, the recipe trains {model!r}")
    central = float(_get(report, "central.train_audio_s_per_s", path))
    per_client = float(_get(report, "silos.per_client_fit_audio_s_per_s", path))
    silos, silo_share = int(_get(report, "silos.clients", path)), _share(report, "silos", SMOKE_SILO_SHARE)
    together = max(1, min(silos, math.floor(1 / silo_share + 1e-9)))
    speakers = int(_get(report, "speakers.clients", path))
    speaker_share = _share(report, "speakers", SMOKE_SPEAKER_SHARE)
    fit_sum = float(_get(report, "speakers.audio_trained_s", path)) / float(
        _get(report, "speakers.per_client_fit_audio_s_per_s", path))
    at_once = max(1, min(speakers, math.floor(1 / speaker_share + 1e-9)))
    round_s = float(_get(report, "speakers.round_seconds.send_receive", path))
    overhead = max(0.0, round_s - fit_sum / at_once) / math.ceil(speakers / at_once)
    gpu = report.get("gpu") or "a GPU"
    precision = (report.get("requested") or {}).get("precision", "?")
    return Rates(central=central, federated=per_client * together, overhead_s=overhead,
                 greedy=float(_get(report, "silos.decode_audio_s_per_s", path)),
                 beam=float(_get(report, "test.decode_audio_s_per_s", path)),
                 notes=[f"throughput: measured by bench/gpu_smoke.sh on {gpu}, precision {precision} ({path}): central "
                        f"{central:.1f} audio-s/s (central.train_audio_s_per_s: the whole train-central call on a small "
                        "corpus, model build included, at gpu_smoke.sh's batch 16: a lower bound; far below the federated figure, "
                        "the build dominated it: pass --rate); federated "
                        f"{per_client * together:.1f} = {per_client:.1f} per client (silos.per_client_fit_audio_s_per_s) "
                        f"x {together} silos sharing the GPU at client_num_gpus {silo_share:g} (assumes the smoke "
                        "machine's one GPU)",
                        f"per-client overhead: {overhead:.1f} s = the smoke's cross-device round ({round_s:.1f} s "
                        f"send and receive) less its {speakers} clients' fit time / {at_once} at once (an upper bound: "
                        "that one round also paid Ray's start-up and each worker's model build)",
                        f"decoding: greedy {report['silos']['decode_audio_s_per_s']:.1f} audio-s/s (the cross-silo "
                        f"server's dev + test after the round), beam "
                        f"{report['test']['decode_audio_s_per_s']:.1f} (test)"])


def resolve_rates(args, recipe: Recipe) -> Rates:
    rates = smoke_rates(Path(args.from_smoke), recipe.model) if args.from_smoke else Rates(
        central=PUBLISHED_RATE, federated=PUBLISHED_RATE, overhead_s=DEFAULT_OVERHEAD_S,
        notes=[f"throughput: {PUBLISHED_SOURCE}, used for warm-up, central and every client", PUBLISHED_DIFFERS,
               f"per-client overhead: {DEFAULT_OVERHEAD_S:g} s per client and round (assumption: bench/RESULTS.md "
               "measures 56-121 ms per sampled client only for crdnn_tiny on the CPU, nothing for the full crdnn; "
               "15 s covers receiving and sending the 565 MiB fp32 model, loading it onto the GPU and starting a "
               "data loader for each local epoch; --from-smoke measures an upper bound)"])
    if args.rate is not None:
        rates.central = rates.federated = args.rate
        rates.notes = [f"throughput: {args.rate:g} audio-s/s per GPU (--rate), for warm-up, central and every "
                       "client"] + [n for n in rates.notes if not n.startswith(("throughput", "what differs"))]
    if args.client_overhead_s is not None:
        rates.overhead_s = args.client_overhead_s
        rates.notes = [n for n in rates.notes if not n.startswith("per-client")] + [
            f"per-client overhead: {args.client_overhead_s:g} s (--client-overhead-s)"]
    if min(rates.central, rates.federated) <= 0:
        raise PlanError("the throughput must be > 0 audio-s/s")
    return rates


# ---- the estimate ----------------------------------------------------------------------------------------------

SHARES = (1.0, 0.5, 0.33, 0.25)  # client_num_gpus tried: 1 to 4 clients per GPU (the pipeline's choices)


def round_hours(clients_h: list[float], gpus: int, share: float, overhead_h: float) -> float:
    """Wall hours of one round, simulated. clients_h: each client's compute in hours of a whole GPU, in the order
    Flower hands them out. Ray gives a client ``share`` of one GPU, so each GPU has floor(1 / share) slots, taken
    GPU 0 first, then GPU 1, ... (Ray packs fractional GPUs and Flower hands a round's jobs to consecutive actors:
    bench/ray_gpu_placement.py); a client waits for a free slot. A client first spends ``overhead_h`` off the GPU
    (model transfer, data loader start-up), then computes; clients computing on one GPU share its speed equally (sharing adds no compute).
    """
    per_gpu = max(1, math.floor(1 / min(share, 1.0) + 1e-9))
    queue, running, now = list(clients_h), {}, 0.0  # running: slot -> [overhead left, compute left]
    for slot in range(min(gpus * per_gpu, len(queue))):
        running[slot] = [overhead_h, queue.pop(0)]
    while running:
        computing = [0] * gpus
        for slot, (overhead, _) in running.items():
            computing[slot // per_gpu] += overhead <= 0
        step = min(overhead if overhead > 0 else compute * computing[slot // per_gpu]
                   for slot, (overhead, compute) in running.items())
        now += step
        for slot, state in list(running.items()):
            if state[0] > 0:
                state[0] = 0.0 if state[0] - step <= 1e-12 else state[0] - step
            else:
                state[1] -= step / computing[slot // per_gpu]
            if state[0] <= 0 and state[1] <= 1e-12:
                del running[slot]
                if queue:
                    running[slot] = [overhead_h, queue.pop(0)]
    return now


def best_share(clients_h: list[float], gpus: int, overhead_h: float) -> float:
    """The client_num_gpus of SHARES with the shortest round; within 2 % of it, the largest (fewer models per GPU)."""
    times = {share: round_hours(clients_h, gpus, share, overhead_h) for share in SHARES}
    return next(share for share in SHARES if times[share] <= 1.02 * min(times.values()))


def clients_of(recipe: Recipe, data: Data, mode: str) -> tuple[int, int]:
    """(clients of the partition, clients a round): a round takes at most the partition's clients, as the pipeline
    fits clients_per_round to the partition."""
    clients = len(data.silo_h) if mode == "cross-silo" else data.speaker_clients
    return clients, min(recipe.fl[mode].per_round, clients)


def client_hours(recipe: Recipe, data: Data, rates: Rates, mode: str) -> list[float]:
    """Compute hours (whole GPU) of each client of a round: its training slice x local epochs / throughput. Cross-silo
    with every silo a round: the silos' own sizes; otherwise clients of the mean size."""
    clients, per_round = clients_of(recipe, data, mode)
    if mode == "cross-silo" and per_round == clients:
        sizes = data.silo_h
    else:
        sizes = [(sum(data.silo_h) / clients) if mode == "cross-silo" else data.speaker_h] * per_round
    return [h * recipe.fl[mode].local_epochs / rates.federated for h in sizes]


def estimate(recipe: Recipe, data: Data, rates: Rates, gpus: list[int]) -> list[dict]:
    rows = []
    for setting, hours in (("warmup", data.warmup_h), ("central", data.train_h)):
        epochs = recipe.epochs[setting]
        gpu_h = hours * epochs / rates.central
        what = (f"{data.warmup_speakers} speakers, {hours:.1f} h x {epochs} epochs" if setting == "warmup" else
                f"all train speakers, {hours:.1f} h x {epochs} epochs"
                + (" from the warm-up model" if recipe.central_from_warmup else ", from scratch"))
        rows.append({"stage": setting, "what": what, "audio_h": hours * epochs, "gpu_h": gpu_h,
                     "wall_h": {g: gpu_h for g in gpus}, "share": {g: None for g in gpus}})
    overhead_h = rates.overhead_s / 3600
    for mode in MODES:
        fl = recipe.fl[mode]
        compute = client_hours(recipe, data, rates, mode)
        clients, per_round = clients_of(recipe, data, mode)
        if mode == "cross-silo":
            what = (f"{clients} silos ({recipe.silo_sizes}, "
                    f"{rates.federated * sum(compute) / fl.local_epochs / len(compute):.1f} h of training audio each "
                    f"on average), {per_round} a round x {fl.local_epochs} local epochs x {fl.rounds} rounds")
        else:
            what = (f"{per_round} of {clients:,} speaker-clients a round ({60 * data.speaker_h:.1f} min each on "
                    f"average) x {fl.local_epochs} local epochs x {fl.rounds} rounds")
        server_h = fl.server_training_epochs * data.warmup_h / rates.central  # on the server, while clients wait
        if fl.server_training_epochs:
            what += f", + {fl.server_training_epochs} server epoch(s) on the warm-up data a round"
        share = {g: fl.client_num_gpus or best_share(compute, g, overhead_h) for g in gpus}
        wall = {g: fl.rounds * (round_hours(compute, g, share[g], overhead_h) + server_h) for g in gpus}
        audio = fl.rounds * (rates.federated * sum(compute) + fl.server_training_epochs * data.warmup_h)
        rows.append({"stage": mode, "what": what, "audio_h": audio, "gpu_h": fl.rounds * (sum(compute) + server_h),
                     "wall_h": wall, "share": share})
    decoding = decoding_row(recipe, data, rates, gpus)
    if decoding:
        rows.append(decoding)
    return rows


def decoding_row(recipe: Recipe, data: Data, rates: Rates, gpus: list[int]) -> dict | None:
    """Decoding on one GPU (train-central's, or the server's while the clients wait): the dev set after every epoch
    (greedy) and the test set at the end (beam); per round the dev set and, with wer_source server, each client's
    model on server_wer_utterances dev utterances (greedy); the test set for the final and the best model (beam)."""
    if rates.greedy is None or data.dev_h is None:
        return None
    clip_h = data.dev_h / data.dev_utterances

    def dev(limit):
        return data.dev_h if limit is None else min(data.dev_utterances, int(limit)) * clip_h

    audio_greedy = sum(recipe.epochs.values()) * dev(recipe.experiment_dev_max)
    audio_beam = 2 * data.test_h  # warm-up and central
    for fl in recipe.fl.values():
        per_client = clients_of(recipe, data, fl.name)[1] * min(data.dev_utterances, fl.server_wer_utterances) * clip_h
        audio_greedy += fl.rounds * (dev(fl.dev_max_utterances) + (per_client if fl.wer_source == "server" else 0))
        audio_beam += 2 * data.test_h
    gpu_h = audio_greedy / rates.greedy + audio_beam / rates.beam
    return {"stage": "decoding", "what": f"{audio_greedy:,.0f} h greedy (dev every epoch / round, per-client WER), "
            f"{audio_beam:.1f} h beam (test)", "audio_h": None, "gpu_h": gpu_h, "wall_h": {g: gpu_h for g in gpus},
            "share": {g: None for g in gpus}}


# ---- output ----------------------------------------------------------------------------------------------------

def _h(value: float) -> str:
    return f"{value:,.1f}"


def render(recipe: Recipe, data: Data, rates: Rates, rows: list[dict], gpus: list[int], command: str) -> str:
    head = "| stage | what (the recipe's settings) | audio trained, h | GPU-h | " + " | ".join(
        f"wall h, {g} GPU{'s' if g > 1 else ''}" for g in gpus) + " | client_num_gpus (" + " / ".join(
        f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + ") |"
    lines = [head, "|" + "---|" * (5 + len(gpus))]
    for row in rows:
        walls = []
        for g in gpus:
            busy = f" ({100 * row['gpu_h'] / (row['wall_h'][g] * g):.0f} % busy)" if g > 1 and row["share"][g] else ""
            walls.append(_h(row["wall_h"][g]) + busy)
        share = " / ".join(f"{row['share'][g]:g}" for g in gpus) if row["share"][gpus[0]] else "- (one process, one GPU)"
        audio = _h(row["audio_h"]) if row["audio_h"] is not None else "-"
        lines.append(f"| {row['stage']} | {row['what']} | {audio} | {_h(row['gpu_h'])} | " + " | ".join(walls)
                     + f" | {share} |")
    if not any(r["stage"] == "decoding" for r in rows):
        lines.append("| decoding | not included: no decoding throughput without --from-smoke, no dev/test hours without "
                     "--data | - | - | " + " | ".join("-" for _ in gpus) + " | - |")
    total = {g: sum(r["wall_h"][g] for r in rows) for g in gpus}
    lines.append("| **total, stages in turn** (the pipeline) | | | " + _h(sum(r["gpu_h"] for r in rows)) + " | "
                 + " | ".join(f"**{_h(total[g])}** ({total[g] / 24:.1f} days)" for g in gpus) + " | |")
    central = next(r for r in rows if r["stage"] == "central")
    if not recipe.central_from_warmup and max(gpus) > 1:
        side = {g: max(central["wall_h"][g], sum(r["wall_h"][g - 1] for r in estimate(recipe, data, rates, [g - 1])
                                                  if r["stage"] != "central")) for g in gpus if g > 1}
        lines.append("| total with `--set central_device=cuda:N` (central on GPU N of its own, beside the other stages "
                     "on the other GPUs) | | | | " + " | ".join(
                         f"{_h(side[g])} ({side[g] / 24:.1f} days)" if g > 1 else "-" for g in gpus) + " | |")
    notes = data.notes + rates.notes + [
        "warm-up and central: one train-central process on one GPU each (fedasr/models/train.py refuses data-parallel "
        "and distributed runs), so more GPUs do not shorten them; on a GPU the pipeline trains central after the "
        "warm-up (central_beside_warmup auto is false there), on the same `device`, unless `central_device` gives it "
        "a GPU of its own",
        "federated: clients in parallel = GPUs / client_num_gpus (and cores / client_num_cpus: at least one core per "
        "client assumed), the others waiting for a free slot; they fill one GPU's slots before the next (Ray "
        "2.55 packs fractional-GPU actors and Flower's pool hands a round's jobs to consecutive ones: with 0.25 on 8 "
        "GPUs, 10 jobs put 4 clients on one GPU; bench/ray_gpu_placement.py); each client spends the per-client overhead off the GPU, then computes, and a GPU "
        "computing for n clients trains each at 1/n speed; rounds in turn (simulated round by round)",
        "GPU memory is not modeled: clients per GPU x the client's peak (gpu_smoke.json: "
        "silos.client_torch_peak_mib) must fit the GPU",
        "not counted: Ray's start-up and each worker's model build (once per stage), aggregation and checkpoints, "
        "data preparation and partition (CPU stages)",
    ]
    return "\n".join([
        f"Plan for `recipes/CommonVoice/{recipe.language}/run.sh` (model {recipe.model}; {recipe.config_file}, "
        f"{recipe.experiment}; cross-silo and cross-device fl hparams as the pipeline resolves them)",
        "", f"Command: `{command}`", "", *lines, "", "Settings that keep the GPUs busy:",
        *[f"- {n}" for n in recommendations(recipe, data, rates, rows, gpus)], "", "Assumptions and sources:",
        *[f"- {n}" for n in notes], ""])


def recommendations(recipe: Recipe, data: Data, rates: Rates, rows: list[dict], gpus: list[int]) -> list[str]:
    """client_num_gpus per stage and GPU count (with the round time of each candidate), clients per round and
    central_beside_warmup, and the --set line that gives them to the recipe."""
    overhead_h = rates.overhead_s / 3600
    by_stage = {r["stage"]: r for r in rows}
    out = []
    for g in gpus:
        sets = []
        for mode in MODES:
            fl, share = recipe.fl[mode], by_stage[mode]["share"][g]
            compute = client_hours(recipe, data, rates, mode)
            per_round = clients_of(recipe, data, mode)[1]
            tried = ", ".join(f"{s:g}: {_duration(round_hours(compute, g, s, overhead_h))}" for s in SHARES)
            why = "the recipe sets it" if fl.client_num_gpus else "the shortest round, ties to fewer clients per GPU"
            own = client_gpu_share(g, per_round)  # what the pipeline gives the clients when the recipe sets none
            own_h = round_hours(compute, g, own, overhead_h)
            line = (f"{g} GPU{'s' if g > 1 else ''}, {mode}: client_num_gpus {share:g} ({why}; a round with each "
                    f"share: {tried}; the pipeline's own choice: {own:g}). ")
            if mode == "cross-silo":
                line += (f"Each silo trains {_duration(max(compute))} a round: sharing a GPU among silos adds no "
                         "compute, only memory (each holds the 148 M-parameter model, its gradients and Adam state)"
                         + (f"; {per_round} silos on {g} GPUs leave some GPU two silos, so no share beats about two "
                            f"silo-times a round; {per_round} GPUs would take "
                            f"{_duration(round_hours(compute, per_round, 1.0, overhead_h))}"
                            if g < per_round < 2 * g + 1 else "") + ".")
            else:
                slots = g * math.floor(1 / share + 1e-9)
                line += (f"A speaker-client trains {_duration(compute[0])} a round against ~{rates.overhead_s:g} s of "
                         f"start-up, so several per GPU overlap it. Clients per round: keep the recipe's {per_round} "
                         "(it is part of the experiment); "
                         + (f"{slots} would fill every slot "
                            f"({_duration(round_hours([compute[0]] * slots, g, share, overhead_h))} a round)."
                            if slots > per_round else f"more than {slots} would wait for free slots."))
            out.append(line)
            if not fl.client_num_gpus and own_h > 1.02 * round_hours(compute, g, share, overhead_h):
                sets.append(f"--set {mode.replace('-', '_')}.set.client_num_gpus={share:g}")
        if sets:
            out.append(f"{g} GPU{'s' if g > 1 else ''}: `recipes/CommonVoice/{recipe.language}/run.sh CV_DIR "
                       + " ".join(sets) + "` (the pipeline's own share makes those rounds over 2 % longer)")
        else:
            out.append(f"{g} GPU{'s' if g > 1 else ''}: the recipe as it is (the pipeline's own shares are within 2 % "
                       "of the shortest round)")
    out.append("central_beside_warmup: leave auto (false on a GPU). true trains central in a child process on the same "
               "`device` as the warm-up (cuda:0): on 1 GPU two trainings then share it, which adds no compute (worth "
               "trying only if bench/gpu_smoke.sh shows one training leaves the GPU idle). With 2 GPUs or more, "
               "`--set central_device=cuda:N` gives central GPU N of its own beside the other stages, which then "
               "leave GPU N alone (the table's last row).")
    return out


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.0f} s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/full_table_plan.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", default="hparams/pipeline/commonvoice.yaml", help="the pipeline YAML of the recipe")
    parser.add_argument("--lang", default="fr", help="the recipe's language (as run_recipe.sh passes it; default fr)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pipeline YAML, as the recipe takes it (repeatable)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts to plan for (default: 1 8)")
    parser.add_argument("--train-hours", type=float, default=TRAIN_HOURS,
                        help="hours of the train set (default 425: issue 14's figure for Common Voice French train)")
    parser.add_argument("--train-speakers", type=int, default=None,
                        help="speakers of the train set (default: warm-up speakers + speaker-clients, the fewest the "
                             "partition needs); sets the assumed warm-up and speaker-client hours")
    parser.add_argument("--warmup-hours", type=float, default=None, help="hours of the warm-up speakers (assumed "
                        "by default: the paper's text available here does not state them)")
    parser.add_argument("--device-hours", type=float, default=None,
                        help="hours held by all the cross-device speaker-clients together (assumed by default)")
    parser.add_argument("--data", default=None, metavar="PIPELINE_OUT",
                        help="a pipeline folder whose partition stage is done: every hour is read from it")
    parser.add_argument("--rate", type=float, default=None, help="audio-seconds trained per second per GPU "
                        f"(default {PUBLISHED_RATE:g}: SpeechBrain's LibriSpeech seq2seq CRDNN README, about 5 h per "
                        "960 h epoch on one V100 32GB)")
    parser.add_argument("--from-smoke", default=None, metavar="OUT/gpu_smoke.json",
                        help="use the figures bench/gpu_smoke.sh measured (its gpu_smoke.json)")
    parser.add_argument("--client-overhead-s", type=float, default=None,
                        help=f"seconds per client and round outside training (default {DEFAULT_OVERHEAD_S:g}, an "
                             "assumption; --from-smoke measures an upper bound)")
    parser.add_argument("--out", default=None, metavar="FILE.md", help="also write the table there (atomically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedasr.utils.io import atomic_write_text

    try:
        text = plan_text(args, argv if argv is not None else sys.argv[1:])
        print(text)
        if args.out:
            atomic_write_text(args.out, text)
    except (PlanError, PipelineError, ValueError, OSError) as err:
        print(f"full_table_plan: {err}", file=sys.stderr)
        return 2
    return 0


def plan_text(args, argv: list[str]) -> str:
    if any(g < 1 for g in args.gpus):
        raise PlanError(f"--gpus {args.gpus}: counts must be >= 1")
    gpus = sorted(set(args.gpus))
    recipe = read_recipe(args.config, args.set, args.lang)
    if args.data and (args.train_hours != TRAIN_HOURS or args.train_speakers or args.warmup_hours is not None
                      or args.device_hours is not None):
        raise PlanError("--data reads every hour from the pipeline folder: drop --train-hours, --train-speakers, "
                        "--warmup-hours and --device-hours")
    data = data_from_folder(Path(args.data)) if args.data else assumed_data(recipe, args)
    rates = resolve_rates(args, recipe)
    rows = estimate(recipe, data, rates, gpus)
    command = " ".join([".venv/bin/python bench/full_table_plan.py", *argv])
    return render(recipe, data, rates, rows, gpus, command)


if __name__ == "__main__":
    sys.exit(main())
