"""Manifest -> SpeechBrain dataset with audio at the model's sample rate and token targets.

Manifests are read by fedasr.data.manifest (the one reader); audio is decoded with soundfile (wav, flac, mp3)
and resampled to the model's rate with torchaudio's pure-Python resampler.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import soundfile
import speechbrain as sb
import torch
import torchaudio

from fedasr.data.manifest import ManifestError, read_manifest, spread_over_speakers
from fedasr.models.tokenizer import BOS_ID, EOS_ID, Tokenizer

SORTINGS = ("ascending", "descending", "random")
GROUP_FIELDS = ("spk_id", "gender", "age", "accents")


class AudioLoader:
    """Callable ``path -> mono float32 waveform at sample_rate``; one resampler per source rate."""

    def __init__(self, sample_rate: int):
        self.sample_rate = int(sample_rate)
        self._resamplers: dict[int, torch.nn.Module] = {}

    def __call__(self, path: str) -> torch.Tensor:
        try:
            data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise ManifestError(f"{path}: cannot decode audio ({err}). Re-create the clip or drop its row.") from None
        wav = torch.from_numpy(data).mean(dim=1)
        if rate != self.sample_rate:
            if rate not in self._resamplers:
                self._resamplers[rate] = torchaudio.transforms.Resample(rate, self.sample_rate)
            wav = self._resamplers[rate](wav)
        return wav


def _check_audio_files(manifest: Path, utterances) -> None:
    missing = [(i + 2, u.wav) for i, u in enumerate(utterances) if not os.path.exists(u.wav)]
    if missing:
        shown = "; ".join(f"line {line}: {wav}" for line, wav in missing[:3])
        raise ManifestError(
            f"{manifest}: {len(missing)} audio file(s) missing ({shown}{' ...' if len(missing) > 3 else ''}). "
            "Re-run `fedasr prepare` with the right Common Voice folder, or fix the wav column."
        )


def make_dataset(manifest: str | os.PathLike, tokenizer: Tokenizer, *, sample_rate: int, sorting: str = "ascending",
                 max_utterances: int | None = None) -> sb.dataio.dataset.DynamicItemDataset:
    """Dataset yielding id, sig, wrd, tokens_bos, tokens_eos, tokens (+ spk_id, gender, age, accents).

    ``max_utterances``: a fixed subset of that many, drawn across the speakers (``spread_over_speakers``)."""
    manifest = Path(manifest)
    if sorting not in SORTINGS:
        raise ValueError(f"sorting must be one of {SORTINGS}, not {sorting!r} (hparams key 'sorting').")
    utterances = read_manifest(manifest)
    if max_utterances is not None:
        utterances = spread_over_speakers(utterances, int(max_utterances))
    if not utterances:
        raise ManifestError(f"{manifest}: no utterances. Check the partition / prepare step that wrote it.")
    _check_audio_files(manifest, utterances)
    data = {u.ID: {k: v for k, v in asdict(u).items() if k != "ID"} for u in utterances}
    dataset = sb.dataio.dataset.DynamicItemDataset(data)
    load_audio = AudioLoader(sample_rate)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens_bos", "tokens_eos", "tokens")
    def text_pipeline(wrd):
        ids = tokenizer.encode(wrd)
        yield torch.LongTensor([BOS_ID] + ids)
        yield torch.LongTensor(ids + [EOS_ID])
        yield torch.LongTensor(ids)

    dataset.add_dynamic_item(audio_pipeline)
    dataset.add_dynamic_item(text_pipeline)
    dataset.set_output_keys(["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens", *GROUP_FIELDS])
    if sorting == "random":
        return dataset
    return dataset.filtered_sorted(sort_key="duration", reverse=sorting == "descending")


def manifest_sentences(manifest: str | os.PathLike) -> list[str]:
    """Transcripts of a manifest (tokenizer training text)."""
    return [u.wrd for u in read_manifest(manifest)]
