"""fedasr: federated end-to-end speech recognition on Flower and SpeechBrain.

The stages as Python functions (each also a ``fedasr`` command; the pipeline, ``fedasr demo``/``pipeline``, chains
them)::

    from fedasr import (synthesize_corpus, prepare_common_voice, partition_manifest, train_central, federate,
                        evaluate, compare_runs)

    prepare_common_voice("cv-corpus/fr", "out/manifests", lang="fr")
    partition_manifest("out/manifests", "out/partitions/cross-silo", mode="cross-silo", clients=10)
    train_central("hparams/CommonVoice/fr.yaml", {"output_folder": "out/runs/warmup",
                  "train_csv": "out/partitions/cross-silo/warmup/train.csv", "manifest_folder": "out/manifests"})
    federate("hparams/fl/cross_silo.yaml", partition="out/partitions/cross-silo",
             seed_checkpoint="out/runs/warmup/seed_checkpoint", output_dir="out/runs/cross-silo")
    evaluate("out/runs/warmup/seed_checkpoint", "out/manifests/test.csv", out_dir="out/runs/warmup/eval")
    compare_runs(["out/runs/warmup", "out/runs/cross-silo"], "out/report")

Names are imported on first use: ``import fedasr`` stays light (a Flower ClientApp process imports this package).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {  # public name -> "module:attribute"
    "synthesize_corpus": "fedasr.data.synth:synthesize_corpus",
    "prepare_common_voice": "fedasr.data.commonvoice:prepare_common_voice",
    "partition_manifest": "fedasr.data.partition:partition_manifest",
    "train_central": "fedasr.models.train:train_central",
    "federate": "fedasr.fl.simulation:federate",
    "evaluate": "fedasr.models.evaluate:evaluate_checkpoint",
    "compare_runs": "fedasr.report.compare:compare_runs",
    "run_pipeline": "fedasr.pipeline:run_pipeline",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fedasr' has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
