"""Helper of bench/gpu_smoke.sh: the timed test-decoding stage, and the report of a finished smoke run.

    python bench/gpu_smoke_report.py --decode OUT_DIR DEVICE PRECISION   # beam-decode test.csv with the seed
    python bench/gpu_smoke_report.py --report OUT_DIR DEVICE PRECISION   # the table + OUT_DIR/gpu_smoke.json

Where each figure comes from: stage wall time and the whole GPU's peak memory (nvidia-smi, sampled every 0.25 s)
from OUT_DIR/stages.tsv; the device of the central run from its result.json; the federated server's device from
the `devices: server ...` line the run logs, its clients' from the round's metrics (train_fit_gpu_clients: replies
trained on CUDA; train_fit_gpu_peak_mib_max: the largest per-client torch peak); audio seconds from the manifests.
Training throughput = audio seconds trained / seconds spent training (central: the whole train-central call, which
also builds the model and passes dev and test once; federated: the round's send-and-receive wall time, start-up of
the Ray workers and the model build on each included, and per client its fit time alone).
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def audio_seconds(manifest: str | Path) -> float:
    with open(manifest, newline="", encoding="utf-8") as handle:
        return sum(float(row["duration"]) for row in csv.DictReader(handle))


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
    with open(out / "stages.tsv", newline="", encoding="utf-8") as handle:
        return {r["stage"]: {"seconds": float(r["seconds"]), "gpu_peak_mib": float(r["gpu_peak_mib"])}
                for r in csv.DictReader(handle, delimiter="\t")}


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
    }
    try:
        import torch

        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        summary["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - the report must not fail on this
        pass
    (out / "gpu_smoke.json").write_text(json.dumps(summary, indent=2))

    def num(value, digits=1):
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    c, s, d, t = summary["central"], summary["silos"], summary["speakers"], summary["test"]
    lines = [
        f"gpu_smoke: {summary.get('gpu') or 'no GPU'} | torch {summary.get('torch')} | requested device {device}, "
        f"precision {precision} | total {num(summary['total_seconds'])} s",
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
    lines.append(f"{'test':<10} {t['device'] + ' (beam, ' + t['precision'] + ')':<60} {'-':>11} "
                 f"{num(t['decode_audio_s_per_s']):>12} {num(t['torch_peak_mib'], 0):>14} "
                 f"{num(stages['test']['gpu_peak_mib'], 0):>12} {num(stages['test']['seconds']):>7}")
    lines.append("train a-s/s: seconds of audio trained per second (federated: round wall time; per client fit only: "
                 + ", ".join(f"{n} {num(f['per_client_fit_audio_s_per_s'])}" for n, f in (("silos", s), ("speakers", d)))
                 + "); decode a-s/s: audio seconds decoded per second (federated: dev + test greedy after the round; "
                 "test: beam search).")
    lines.append(f"written: {out / 'gpu_smoke.json'}")
    print("\n".join(lines))


if __name__ == "__main__":
    mode, out_dir, device, precision = sys.argv[1:5]
    {"--decode": decode, "--report": report}[mode](Path(out_dir), device, precision)
