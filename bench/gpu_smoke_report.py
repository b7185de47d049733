"""Helper of bench/gpu_smoke.sh: the sequential-clients and the timed test-decoding stages, and the report of a
finished smoke run.

    python bench/gpu_smoke_report.py --clients N OUT_DIR DEVICE PRECISION  # N client fits in one process: memory
    python bench/gpu_smoke_report.py --decode OUT_DIR DEVICE PRECISION     # beam-decode test.csv with the seed
    python bench/gpu_smoke_report.py --report OUT_DIR DEVICE PRECISION     # the table + OUT_DIR/gpu_smoke.json

Where each figure comes from: stage wall time and the whole GPU's peak memory (nvidia-smi, sampled every 0.25 s)
from OUT_DIR/stages.tsv; the device of the central run from its result.json; the federated server's device from
the `devices: server ...` line the run logs, its clients' from the round's metrics (train_fit_gpu_clients: replies
trained on CUDA; train_fit_gpu_peak_mib_max: the largest per-client torch peak); audio seconds from the manifests.
Training throughput = audio seconds trained / seconds spent training (central: the whole train-central call, which
also builds the model and passes dev and test once; federated: the round's send-and-receive wall time, start-up of
the Ray workers and the model build on each included, and per client its fit time alone). Memory across clients
(issue 14: does a worker that trains client after client hold more with each?): OUT_DIR/clients<N>/memory.json,
written by --clients. gpu_smoke.json is strict JSON: a figure not measured (NaN) is null.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def audio_seconds(manifest: str | Path) -> float:
    from fedasr.data.manifest import read_manifest

    return sum(utterance.duration for utterance in read_manifest(manifest))


def resident_mib() -> float | None:
    """This process's resident set size now (Linux: /proc/self/statm), None where there is no /proc."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def sequential_clients(out: Path, device: str, precision: str, count: int) -> None:
    """``count`` client fits in a row in this one process, as a Ray worker trains the clients it is given: through
    the ClientApp's own per-message function (fedasr.fl.client_app.train_on_partition, its system cached across
    messages) with the round config the speakers stage sent (OUT_DIR/speakers/fl_config.json; DEVICE and PRECISION
    as given). Client i trains speaker-client i % K of that partition with the config of round i // K + 1, from the
    seed's arrays each time (the server's initial arrays), and its reply is dropped before the next.

    After each fit: torch's CUDA memory allocated and reserved, the fit's torch peak (the reply's fit-gpu-peak-mib),
    and the process's resident set (/proc/self/statm) and high-water mark (ru_maxrss); on the CPU only the last two.
    Writes OUT_DIR/clients<count>/memory.json."""
    import torch
    from flwr.app import ConfigRecord

    from fedasr.data.partition import load_partition
    from fedasr.fl.arrays import state_to_arrayrecord
    from fedasr.fl.client_app import client_device, train_on_partition
    from fedasr.fl.config import config_from_json, import_system_class
    from fedasr.fl.protocol import (DEVICE, FIT_GPU_PEAK_MIB, FIT_SECONDS, LOCAL_EPOCHS, NUM_EXAMPLES, PARTITION_ID,
                                    PRECISION, round_config)

    resolved = json.loads((out / "speakers" / "fl_config.json").read_text())
    config = config_from_json(json.dumps(resolved["config"]))
    seed, partition, speakers = resolved["seed_checkpoint"], resolved["partition"], int(resolved["num_clients"])
    seed_system = import_system_class(config.system).from_checkpoint(
        seed, overrides=config.system_overrides or None, device="cpu")  # on the CPU, as the server's arrays travel
    arrays = state_to_arrayrecord(seed_system.state_dict())
    del seed_system

    def message_config(client: int) -> ConfigRecord:  # as fedasr.fl.sampling.assign_partitions gives it
        sent = round_config(config, server_round=client // speakers + 1, lr=config.lr, seed_checkpoint=seed,
                            partition=partition)
        return ConfigRecord({**sent, PARTITION_ID: client % speakers, DEVICE: device, PRECISION: precision})

    resolved_device = client_device({}, message_config(0))
    on_cuda = resolved_device.startswith("cuda")
    train_audio = [audio_seconds(c["train"]) for c in load_partition(partition)["clients"]]
    fits = []
    started = time.perf_counter()
    for client in range(count):
        sent = message_config(client)
        reply, metrics = train_on_partition(arrays, sent, partition, client % speakers)
        del reply  # sent to the server: the worker keeps nothing of it
        fits.append({
            "client": client + 1, "partition_id": client % speakers, "examples": int(metrics[NUM_EXAMPLES]),
            "audio_s": train_audio[client % speakers] * int(sent[LOCAL_EPOCHS]),
            "fit_seconds": float(metrics[FIT_SECONDS]),
            "allocated_mib": torch.cuda.memory_allocated(resolved_device) / 2**20 if on_cuda else None,
            "reserved_mib": torch.cuda.memory_reserved(resolved_device) / 2**20 if on_cuda else None,
            "fit_peak_mib": metrics.get(FIT_GPU_PEAK_MIB),
            "rss_mib": resident_mib(),
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        })
        print(json.dumps(fits[-1]), flush=True)
    seconds = time.perf_counter() - started
    measured = "allocated_mib" if on_cuda else "rss_mib"
    first, tenth, last = (fits[min(n, count) - 1][measured] for n in (1, 10, count))
    result = {
        "device": resolved_device, "precision": precision, "clients": count, "speaker_clients": speakers,
        "seconds": seconds,
        "memory": ("torch.cuda.memory_allocated after each fit (reserved: memory_reserved; peak: the fit's torch "
                   "peak)" if on_cuda else "process RSS after each fit (/proc/self/statm; peak: ru_maxrss so far)"),
        "after_first_mib": first, "after_tenth_mib": tenth, "after_last_mib": last,
        # A leak grows with every client; the allocator's warm-up (the CPU's malloc arenas) stops after a few.
        "growth_mib": last - first if first is not None else None,
        "growth_since_tenth_mib": last - tenth if tenth is not None else None,
        "max_peak_mib": max(f["fit_peak_mib"] for f in fits) if on_cuda else fits[-1]["max_rss_mib"],
        "train_audio_s_per_s": sum(f["audio_s"] for f in fits) / sum(f["fit_seconds"] for f in fits),
        "fits": fits,
    }
    folder = out / f"clients{count}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"{count} fits on {resolved_device} in {seconds:.1f} s; {result['memory']}: after client 1 {first} MiB, "
          f"10 {tenth} MiB, {count} {last} MiB")


def decode(out: Path, device: str, precision: str) -> None:
    import torch

    from fedasr.models.evaluate import evaluate_checkpoint
    from fedasr.utils.device import peak_gpu_memory, resolve_device

    resolved = resolve_device(device)
    started = time.perf_counter()
    report = evaluate_checkpoint(out / "central" / "seed_checkpoint", out / "manifests" / "test.csv", decoding="beam",
                                 out_dir=out / "test", device=resolved, precision=precision)
    seconds = time.perf_counter() - started
    peak = peak_gpu_memory(resolved)
    result = {"device": report["device"], "precision": report["precision"], "seconds": seconds,
              "wer": report["overall"]["wer"], "torch_peak_mib": peak / 2**20 if peak is not None else None,
              "cuda_initialized": bool(torch.cuda.is_initialized())}
    (out / "test" / "timing.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def stage_table(out: Path) -> dict[str, dict]:
    """Per stage: wall seconds and the whole GPU's peak MiB (NaN without nvidia-smi, the CPU dry run; null in
    gpu_smoke.json, see :func:`strict`)."""
    with open(out / "stages.tsv", newline="", encoding="utf-8") as handle:
        return {r["stage"]: {"seconds": float(r["seconds"]), "gpu_peak_mib": float(r["gpu_peak_mib"])}
                for r in csv.DictReader(handle, delimiter="\t")}


def strict(value):
    """``value`` with every NaN or infinity replaced by None, so that it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def federated(out: Path, name: str, partition: str) -> dict:
    from fedasr.data.partition import load_partition

    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = rows[-1]
    config = json.loads((out / name / "fl_config.json").read_text())
    clients = load_partition(out / partition)["clients"]
    trained = [clients[int(c)] for c in row.get("clients", [])] if row.get("clients") else clients
    epochs = int(config["config"]["local_epochs"])
    audio = epochs * sum(audio_seconds(c["train"]) for c in trained)
    dev_audio = audio_seconds(config["dev_manifest"])
    test_audio = audio_seconds(config["test_manifest"]) if config["test_manifest"] else 0.0
    log = (out / "logs" / f"{name}.log").read_text(errors="replace")
    server = re.search(r"devices: server (\S+), clients (.+?), precision (\S+)", log)
    seconds = row.get("seconds", {})
    fit_sum = row.get("train_fit_seconds_sum")
    gpu_clients = row.get("train_fit_gpu_clients", 0)
    return {
        "client_num_gpus": config["config"].get("client_num_gpus"),  # the GPU share each client ran with
        "server_device": server.group(1) if server else "?",
        "clients_device": (f"cuda ({gpu_clients}/{len(trained)} replies trained on CUDA)" if gpu_clients
                           else f"cpu (0/{len(trained)} replies trained on CUDA)"),
        "clients": len(trained),
        "audio_trained_s": audio,
        "train_audio_s_per_s": audio / seconds["send_receive"] if seconds.get("send_receive") else None,
        "per_client_fit_audio_s_per_s": audio / fit_sum if fit_sum else None,
        "decode_audio_s_per_s": (dev_audio + test_audio) / seconds["evaluate"] if seconds.get("evaluate") else None,
        "client_torch_peak_mib": row.get("train_fit_gpu_peak_mib_max"),
        "dev_wer": row.get("dev_wer"),
        "round_seconds": seconds,
    }


def report(out: Path, device: str, precision: str) -> None:
    stages = stage_table(out)
    central = json.loads((out / "central" / "result.json").read_text())
    train_audio = audio_seconds(out / "manifests" / "train.csv") * int(central["epochs"])
    test = json.loads((out / "test" / "timing.json").read_text())
    test_audio = audio_seconds(out / "manifests" / "test.csv")
    summary = {
        "requested": {"device": device, "precision": precision},
        "stages": stages,
        "central": {"device": central.get("device"), "precision": central.get("precision"),
                    "model": central.get("model"), "parameters": central.get("num_parameters"),
                    "audio_trained_s": train_audio, "seconds": central["seconds"],
                    "train_audio_s_per_s": train_audio / central["seconds"],
                    "torch_peak_mib": central.get("gpu_peak_mib")},
        "silos": federated(out, "silos", "p_silos"),
        "speakers": federated(out, "speakers", "p_speakers"),
        "test": {**test, "audio_s": test_audio, "decode_audio_s_per_s": test_audio / test["seconds"]},
        "total_seconds": sum(s["seconds"] for s in stages.values()),
        "gpu": None, "visible_gpus": 0, "torch": None, "cuda": None,
    }
    sequential = next((name for name in stages if re.fullmatch(r"clients\d+", name)), None)
    if sequential:  # absent from smoke folders written before the stage existed
        summary[sequential] = json.loads((out / sequential / "memory.json").read_text())
    try:
        import torch

        from fedasr.utils.device import visible_gpus

        summary["visible_gpus"] = visible_gpus()
        summary["gpu"] = torch.cuda.get_device_name(0) if summary["visible_gpus"] else None
        summary["torch"] = torch.__version__
        summary["cuda"] = torch.version.cuda  # None on a CPU-only build
    except Exception:  # noqa: BLE001 - the report must not fail on this
        pass
    (out / "gpu_smoke.json").write_text(json.dumps(strict(summary), indent=2, allow_nan=False))

    def num(value, digits=1):
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    c, s, d, t = summary["central"], summary["silos"], summary["speakers"], summary["test"]
    lines = [
        f"gpu_smoke: {summary['gpu'] or 'no GPU'} ({summary['visible_gpus']} visible) | torch {summary['torch']}, "
        f"CUDA {summary['cuda']} | requested device {device}, precision {precision} | total "
        f"{num(summary['total_seconds'])} s",
        f"{'stage':<10} {'device actually used':<60} {'train a-s/s':>11} {'decode a-s/s':>12} "
        f"{'torch peak MiB':>14} {'GPU peak MiB':>12} {'wall s':>7}",
        f"{'central':<10} {c['device'] + ' (' + str(c['model']) + ', ' + str(c['precision']) + ')':<60} "
        f"{num(c['train_audio_s_per_s']):>11} {'-':>12} {num(c['torch_peak_mib'], 0):>14} "
        f"{num(stages['central']['gpu_peak_mib'], 0):>12} "
        f"{num(stages['central']['seconds']):>7}",
    ]
    for name, f in (("silos", s), ("speakers", d)):
        used = f"server {f['server_device']}, clients {f['clients_device']}"
        lines.append(f"{name:<10} {used:<60} {num(f['train_audio_s_per_s']):>11} {num(f['decode_audio_s_per_s']):>12} "
                     f"{num(f['client_torch_peak_mib'], 0):>14} {num(stages[name]['gpu_peak_mib'], 0):>12} "
                     f"{num(stages[name]['seconds']):>7}")
    if sequential:
        m = summary[sequential]
        used = f"{m['device']}: {m['clients']} fits in one process ({m['speaker_clients']} speaker-clients in turn)"
        lines.append(f"{sequential:<10} {used:<60} {num(m['train_audio_s_per_s']):>11} {'-':>12} "
                     f"{num(m['max_peak_mib'], 0) if m['device'].startswith('cuda') else '-':>14} "
                     f"{num(stages[sequential]['gpu_peak_mib'], 0):>12} {num(stages[sequential]['seconds']):>7}")
    lines.append(f"{'test':<10} {t['device'] + ' (beam, ' + t['precision'] + ')':<60} {'-':>11} "
                 f"{num(t['decode_audio_s_per_s']):>12} {num(t['torch_peak_mib'], 0):>14} "
                 f"{num(stages['test']['gpu_peak_mib'], 0):>12} {num(stages['test']['seconds']):>7}")
    lines.append("train a-s/s: seconds of audio trained per second (federated: round wall time; "
                 + (f"{sequential}: fit time only; " if sequential else "") + "per client fit only: "
                 + ", ".join(f"{n} {num(f['per_client_fit_audio_s_per_s'])}" for n, f in (("silos", s), ("speakers", d)))
                 + "); decode a-s/s: audio seconds decoded per second (federated: dev + test greedy after the round; "
                 f"test: beam search). client_num_gpus: silos {s['client_num_gpus']}, speakers {d['client_num_gpus']}.")
    if sequential:
        m, fits = summary[sequential], summary[sequential]["fits"]
        after = (f"after client 1 / 10 / {m['clients']}: {num(m['after_first_mib'])} / {num(m['after_tenth_mib'])} / "
                 f"{num(m['after_last_mib'])} MiB (growth since client 10: {num(m['growth_since_tenth_mib'])} MiB)")
        if m["device"].startswith("cuda"):
            lines.append(f"memory across {m['clients']} clients, torch allocated {after}; reserved "
                         f"{num(fits[0]['reserved_mib'])} -> {num(fits[-1]['reserved_mib'])} MiB; max fit peak "
                         f"{num(m['max_peak_mib'])} MiB; host RSS {num(fits[0]['rss_mib'])} -> "
                         f"{num(fits[-1]['rss_mib'])} MiB")
        else:
            lines.append(f"memory across {m['clients']} clients, process RSS (no CUDA; /proc/self/statm) {after}; "
                         f"peak RSS {num(m['max_peak_mib'])} MiB")
    lines.append(f"written: {out / 'gpu_smoke.json'}")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--clients":
        count, out_dir, device, precision = sys.argv[2:6]
        sequential_clients(Path(out_dir), device, precision, int(count))
    else:
        mode, out_dir, device, precision = sys.argv[1:5]
        {"--decode": decode, "--report": report}[mode](Path(out_dir), device, precision)
