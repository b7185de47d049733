"""``SpeechBrainASRSystem``: the fedasr.models.api.ASRSystem protocol over the YAML-defined model.

Built once per process from a seed checkpoint, then reused: the federated client calls ``load_state_dict`` and
``fit`` per message. ``fit`` builds a fresh Brain and a fresh SGD optimizer per call, has no checkpointer (so it
never recovers a checkpoint over the received weights) and never decodes. The feature-normaliser statistics are
frozen: they travel in ``state_dict()`` but no training updates them. Torch threads are left to the caller.

Device and precision (fedasr/utils/device.py): the model lives on ``device`` (resolved once: ``auto`` becomes cpu or
cuda:0, an unusable request is a DeviceError), batches are moved there; ``state_dict()`` always returns CPU fp32
copies, so whatever travels or is aggregated stays on the CPU. ``precision`` (fp32 | bf16 | fp16) is SpeechBrain's:
autocast for local training (with gradient scaling at fp16) and for decoding; fp32 leaves the numbers bit-exact.
After each ``fit`` the Brain, its optimizer state and the gradients are released (and CUDA's cache emptied), so a
worker that trains client after client holds one model, not one per client.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.dataloader import make_dataloader
from speechbrain.dataio.sampler import ReproducibleRandomSampler

from fedasr.metrics.wer import error_report
from fedasr.models.api import EvalResult, FitResult
from fedasr.models.brain import ASRBrain, batch_loss, batch_rows, decode_batch
from fedasr.models.checkpoint import HPARAMS_FILENAME, check_checkpoint, load_model_state, read_meta
from fedasr.models.dataio import make_dataset
from fedasr.models.hparams import build_from_text
from fedasr.models.model import DECODING_MODES, AcousticModel, build_acoustic_model
from fedasr.models.rnn_precision import keep_rnns_in_fp32
from fedasr.models.tokenizer import TOKENIZER_FILENAME, Tokenizer
from fedasr.utils.device import autocast, check_precision, loader_options, release_gpu_memory, resolve_device


class StateDictMismatch(ValueError):
    """A state dict that does not fit the model (other architecture or vocabulary)."""


FP16_INIT_SCALE = 2.0**10  # a client's fp16 loss scale at the start of each fit. The Brain is new every fit, and
# torch's default (2**16) is found too high by halving it on every overflowing step, each skipped: a speaker-client
# with a dozen steps could lose most of them. 2**10 leaves gradients down to ~6e-11 representable.


class SpeechBrainASRSystem:
    """A recognizer: role-bound modules + frozen normaliser stats + the one global tokenizer."""

    def __init__(self, model: AcousticModel, tokenizer: Tokenizer, hparams: dict, *, device: str = "cpu",
                 meta: dict | None = None, precision: str = "fp32"):
        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.model = model.to(self.device)
        keep_rnns_in_fp32(self.model, self.device, self.precision)  # bf16 on CUDA: no unscaled fp16 LSTMs
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.meta = dict(meta or {})

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, overrides: dict | None = None,
                        device: str = "cpu", precision: str = "fp32") -> "SpeechBrainASRSystem":
        check_precision(precision, resolve_device(device))  # an unusable device: refused before any loading
        checkpoint_dir = check_checkpoint(checkpoint_dir)
        yaml_path = checkpoint_dir / HPARAMS_FILENAME
        experiment = build_from_text(yaml_path.read_text(encoding="utf-8"), overrides, source=yaml_path)
        model = build_acoustic_model(experiment.hparams, source=yaml_path)
        model.load_state_dict(load_model_state(checkpoint_dir, model=model))  # checks weights + tokenizer fit
        model.freeze_normalizer()
        model.eval()
        tokenizer = Tokenizer(checkpoint_dir / TOKENIZER_FILENAME)
        return cls(model, tokenizer, experiment.hparams, device=device, meta=read_meta(checkpoint_dir),
                   precision=precision)

    # ---- weights ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All parameters and buffers (BatchNorm statistics, normaliser statistics), detached CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong_shape = sorted(k for k in set(own) & set(state) if own[k].numel() and own[k].shape != state[k].shape)
        if missing or unexpected or wrong_shape:
            raise StateDictMismatch(
                f"state dict does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape {wrong_shape[:5]}. Were server and clients built from the same seed checkpoint?"
            )
        self.model.load_state_dict(state)
        self.model.freeze_normalizer()

    def loader_options(self) -> dict:
        """Workers and pinned memory of this system's DataLoaders (hparams ``num_workers``: auto = none on the CPU,
        a few on a GPU; see fedasr.utils.device.loader_options)."""
        return loader_options(self.device, self.hparams.get("num_workers", "auto"))

    # ---- local training --------------------------------------------------------------------------------------
    def fit(self, manifest: str | Path, *, epochs: int, lr: float, batch_size: int, seed: int,
            proximal_mu: float = 0.0, optimizer: str = "sgd", momentum: float = 0.0) -> FitResult:
        """``epochs`` epochs of local training with a fresh ``optimizer`` (its state starts empty every call: no
        moment estimates travel between rounds or clients); no checkpoint recovery, no decoding.

        ``optimizer``: "sgd" (with ``momentum``; 0 = plain SGD, the published client) or "adam".
        ``proximal_mu`` > 0 adds FedProx's proximal term towards the weights held at the start of the call.
        """
        start = time.perf_counter()
        random.seed(seed)  # SpeechBrain's Augmenter draws from Python's random
        torch.manual_seed(seed)
        dataset = make_dataset(manifest, self.tokenizer, sample_rate=self.hparams["sample_rate"], sorting="random")
        sampler = ReproducibleRandomSampler(dataset, seed=seed)
        loader = make_dataloader(dataset, batch_size=batch_size, sampler=sampler, **self.loader_options())
        anchor = [p.detach().clone() for p in self.model.parameters() if p.requires_grad] if proximal_mu else []
        brain = ASRBrain(
            modules={"model": self.model},
            opt_class=client_optimizer(optimizer, lr=lr, momentum=momentum),
            hparams={"tokenizer": self.tokenizer, "valid_search": None, "test_search": None,
                     "proximal_mu": float(proximal_mu), "proximal_anchor": anchor},
            run_opts={"device": self.device, "noprogressbar": True, "precision": self.precision,
                      "eval_precision": self.precision,
                      "max_grad_norm": float(self.hparams.get("max_grad_norm", 5.0))},
            checkpointer=None,
        )
        if brain.scaler.is_enabled():  # fp16 on CUDA: start near a working scale (see FP16_INIT_SCALE)
            brain.scaler = torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE)
        brain.train_sampler = sampler  # Brain.fit calls set_epoch on it: a new order every epoch
        try:
            brain.fit(sb.utils.epoch_loop.EpochCounter(epochs), loader, progressbar=False)
            losses = list(getattr(brain, "train_losses", []))
        finally:
            # What this client allocated goes now: the Brain holds the optimizer (Adam's moments: two model-sized
            # tensors), the FedProx anchor and the gradient scaler; the gradients sit on the parameters.
            del brain, anchor
            self.model.zero_grad(set_to_none=True)
            self.model.eval()
            self.release_batch_state()
        return FitResult(train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
                         num_examples=len(dataset), seconds=time.perf_counter() - start)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def transcribe_manifest(self, manifest: str | Path, *, decoding: str = "greedy",
                            max_utterances: int | None = None) -> tuple[list[dict], float]:
        """Per-utterance rows (ID, spk_id, gender, age, accents, ref, hyp, errors, ...) and the mean loss."""
        if decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {DECODING_MODES}, not {decoding!r}")
        dataset = make_dataset(manifest, self.tokenizer, sample_rate=self.hparams["sample_rate"],
                               sorting="ascending", max_utterances=max_utterances)
        loader = make_dataloader(dataset, batch_size=int(self.hparams.get("eval_batch_size", 8)),
                                 **self.loader_options())
        rows: list[dict] = []
        loss_sum, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(self.device)
                with autocast(self.device, self.precision):  # a no-op at fp32
                    out, hyps = decode_batch(self.model, batch, self.tokenizer, decoding)
                    loss = batch_loss(self.model, out, batch)
                loss_sum += float(loss) * len(batch.id)
                count += len(batch.id)
                rows.extend(batch_rows(batch, hyps))
        self.release_batch_state()  # the server decodes on the GPU its clients share
        return rows, loss_sum / max(count, 1)

    def release_batch_state(self) -> None:
        """Drop what the last batch left behind: the attention's cached projection of that batch's encoder states
        and its mask (SpeechBrain keeps them until the next forward), and on CUDA the allocator's cached blocks."""
        attention = getattr(self.model.roles["decoder"], "attn", None) if self.model.has_decoder else None
        if attention is not None and hasattr(attention, "reset"):
            attention.reset()
        release_gpu_memory(self.device)

    def evaluate(self, manifest: str | Path, *, decoding: str = "greedy", max_utterances: int | None = None,
                 per_utterance: bool = False) -> EvalResult:
        rows, loss = self.transcribe_manifest(manifest, decoding=decoding, max_utterances=max_utterances)
        total = error_report(rows, group_columns=())["overall"]
        return EvalResult(
            wer=total["wer"], cer=total["cer"], word_errors=total["word_errors"], words=total["words"],
            char_errors=total["char_errors"], chars=total["chars"], num_utterances=total["utterances"],
            loss=loss, per_utterance=rows if per_utterance else [],
        )


def client_optimizer(name: str, *, lr: float, momentum: float = 0.0):
    """The optimizer class (bound to its settings) a local training builds: SGD (``momentum`` >= 0) or Adam."""
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)
    if name == "adam":
        if momentum:
            raise ValueError(f"momentum applies to the sgd optimizer only, got optimizer adam with momentum {momentum}")
        return functools.partial(torch.optim.Adam, lr=lr)
    raise ValueError(f"client optimizer must be sgd or adam, got {name!r}")

