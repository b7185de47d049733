"""A small Common-Voice-shaped corpus spoken by espeak-ng voices: the demo and test corpus of fedasr.

The output has the exact layout of a Common Voice release of one locale::

    out_dir/clips/common_voice_<lang>_<n>.mp3     48 kHz mono MP3 (written with soundfile)
    out_dir/train.tsv dev.tsv test.tsv validated.tsv

with the current Common Voice header (:data:`TSV_COLUMNS`). One speaker is one espeak-ng voice: a base voice of
the language (its accent), a variant (m1..m7, f1..f5: its gender), a pitch and a speed, all drawn from the seed.
Speakers are disjoint across train/dev/test (about 70/15/15 %), as in Common Voice. Sentences come from the
template grammar in ``fedasr/data/sentences/<lang>.txt``; a pool of sentences is shared by the speakers, so one
sentence is read by several speakers and a dev/test sentence may also be read in train (Common Voice allows
this too; the speakers never overlap).

Everything is deterministic for a seed: two runs give identical TSVs and identical MP3 bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from fedasr.utils.io import atomic_open, atomic_write_json, done_marker, is_done, mark_done, read_json

log = logging.getLogger(__name__)

TSV_COLUMNS = (
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
    "age", "gender", "accents", "variant", "locale", "segment",
)
SAMPLE_RATE = 48_000
ESPEAK_RATE = 22_050
DEFAULT_SPEAKERS = 40
DEFAULT_UTTERANCES_PER_SPEAKER = 20
MIN_WORDS, MAX_WORDS = 3, 8
SPLIT_FRACTIONS = {"dev": 0.15, "test": 0.15}  # the rest is train
SENTENCE_READINGS = 3  # average number of speakers reading one sentence of the pool
FIRST_CLIP_NUMBER = 20_000_000
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
PITCH_RANGE = (25, 75)
SPEED_RANGE = (125, 185)  # words per minute: intelligible
AGES = ("teens", "twenties", "thirties", "fourties", "fifties", "sixties")  # Common Voice spelling
STAGE = "synth"
SYNTH_VERSION = 1

# Base espeak-ng voice of each language -> the accent label written in the TSV, with its drawing weight.
ACCENT_VOICES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "fr": (
        ("fr-fr", "Français de France", 0.6),
        ("fr-be", "Français de Belgique", 0.2),
        ("fr-ch", "Français de Suisse", 0.2),
    ),
    "en": (
        ("en-us", "United States English", 0.5),
        ("en-gb", "England English", 0.3),
        ("en-gb-scotland", "Scottish English", 0.2),
    ),
}
SUPPORTED_LANGUAGES = tuple(sorted(ACCENT_VOICES))

_SLOT = re.compile(r"\{([A-Z_]+)\}")
_WORD = re.compile(r"[^\W_]")  # a token counts as a word when it holds a letter or digit
_FIRST_LETTER = re.compile(r"[^\W\d_]")


class SynthError(ValueError):
    """Bad arguments or a folder that cannot receive the corpus; the message says what to change."""


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed on a sentence."""


@dataclass(frozen=True)
class Grammar:
    classes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Speaker:
    index: int
    client_id: str
    split: str
    voice: str  # espeak-ng -v argument, e.g. "fr-be+f2"
    pitch: int
    speed: int
    gain: float
    noise_db: float  # white noise level relative to full scale
    gender: str
    age: str
    accent: str


@dataclass(frozen=True)
class ClipJob:
    path: Path
    text: str
    speaker: Speaker
    noise_seed: tuple[int, ...]


# ---------------------------------------------------------------------------------------------- sentences


def load_grammar(lang: str) -> Grammar:
    """Parse ``fedasr/data/sentences/<lang>.txt`` (format in the file's header)."""
    if lang not in SUPPORTED_LANGUAGES:
        raise SynthError(f"no sentence material for language {lang!r}; choose one of {list(SUPPORTED_LANGUAGES)}")
    source = resources.files("fedasr.data").joinpath("sentences", f"{lang}.txt")
    classes: dict[str, tuple[str, ...]] = {}
    templates: list[str] = []
    for line_no, raw in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("="):
            name, _, alternatives = line[1:].partition(":")
            classes[name.strip()] = tuple(a.strip() for a in alternatives.split("|") if a.strip())
        elif line.startswith(">"):
            templates.append(line[1:].strip())
        else:
            raise SynthError(f"{source}, line {line_no}: expected '= NAME: a | b' or '> template', got {raw!r}")
    for template in templates:
        for name in _SLOT.findall(template):
            if name not in classes:
                raise SynthError(f"{source}: template {template!r} uses unknown word class {name!r}")
    return Grammar(classes=classes, templates=tuple(templates))


def count_words(sentence: str) -> int:
    """Words of a sentence: whitespace tokens holding at least one letter (punctuation marks do not count)."""
    return sum(1 for token in sentence.split() if _WORD.search(token))


def fill_template(template: str, grammar: Grammar, rng: random.Random) -> str:
    """One sentence from a template, its first letter capitalised as in Common Voice."""
    text = _SLOT.sub(lambda m: rng.choice(grammar.classes[m.group(1)]), template)
    return _FIRST_LETTER.sub(lambda m: m.group(0).upper(), text, count=1)


def sentence_pool(grammar: Grammar, size: int, seed: int) -> list[str]:
    """``size`` distinct sentences of 3 to 8 words (fewer if the grammar cannot make that many)."""
    rng = random.Random(f"fedasr-synth:{seed}:sentences")
    pool: dict[str, None] = {}
    misses = 0  # draws in a row that gave nothing new: the grammar is exhausted when they pile up
    while len(pool) < size and misses < 10_000:
        sentence = fill_template(rng.choice(grammar.templates), grammar, rng)
        if MIN_WORDS <= count_words(sentence) <= MAX_WORDS and sentence not in pool:
            pool[sentence] = None
            misses = 0
        else:
            misses += 1
    return list(pool)


# ---------------------------------------------------------------------------------------------- speakers


def split_sizes(n_speakers: int) -> dict[str, int]:
    """Speakers per split: about 15 % dev, 15 % test (at least one each), the rest train."""
    if n_speakers < 3:
        raise SynthError(f"speakers={n_speakers}: need at least 3 speakers (one each for train, dev and test)")
    dev = max(1, round(SPLIT_FRACTIONS["dev"] * n_speakers))
    test = max(1, round(SPLIT_FRACTIONS["test"] * n_speakers))
    return {"train": n_speakers - dev - test, "dev": dev, "test": test}


def make_speakers(lang: str, n_speakers: int, seed: int) -> list[Speaker]:
    """Draw the speakers' voices and metadata from the seed; splits are assigned over a seeded shuffle."""
    sizes = split_sizes(n_speakers)
    order = list(range(n_speakers))
    random.Random(f"fedasr-synth:{seed}:splits").shuffle(order)
    ranked_splits = ["train"] * sizes["train"] + ["dev"] * sizes["dev"] + ["test"] * sizes["test"]
    split_of = {index: split for index, split in zip(order, ranked_splits)}
    variants = random.Random(f"fedasr-synth:{seed}:variants").sample(VARIANTS, len(VARIANTS))
    accents = ACCENT_VOICES[lang]
    speakers = []
    for index in range(n_speakers):
        rng = random.Random(f"fedasr-synth:{seed}:speaker:{index}")
        variant = variants[index % len(variants)]
        base_voice, accent, _ = rng.choices(accents, weights=[a[2] for a in accents])[0]
        speakers.append(
            Speaker(
                index=index,
                client_id=hashlib.sha512(f"fedasr-synth:{lang}:{seed}:{index}".encode()).hexdigest(),
                split=split_of[index],
                voice=f"{base_voice}+{variant}",
                pitch=rng.randint(*PITCH_RANGE),
                speed=rng.randint(*SPEED_RANGE),
                gain=round(rng.uniform(0.5, 0.9), 3),
                noise_db=round(rng.uniform(-60.0, -45.0), 1),
                gender="male_masculine" if variant.startswith("m") else "female_feminine",
                age=rng.choice(AGES),
                accent=accent,
            )
        )
    return speakers


# ---------------------------------------------------------------------------------------------- audio


def espeak_waveform(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """Run espeak-ng once; returns float32 samples at :data:`ESPEAK_RATE`."""
    command = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text]
    try:
        done = subprocess.run(command, capture_output=True, check=True, timeout=60)
    except FileNotFoundError:
        raise EspeakError(
            "espeak-ng not found on PATH. Install it (Debian/Ubuntu: apt-get install espeak-ng)."
        ) from None
    except subprocess.CalledProcessError as err:
        reason = err.stderr.decode(errors="replace").strip()
        raise EspeakError(f"espeak-ng failed on {text!r} with voice {voice}: {reason}") from None
    samples, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    if rate != ESPEAK_RATE:
        raise EspeakError(f"espeak-ng wrote {rate} Hz audio; expected {ESPEAK_RATE} Hz")
    return samples if samples.ndim == 1 else samples.mean(axis=1)


def to_48k(samples: np.ndarray) -> np.ndarray:
    from scipy.signal import resample_poly  # scipy comes with speechbrain

    ratio = math.gcd(SAMPLE_RATE, ESPEAK_RATE)
    # float64: in float32 the filter's decaying tails over espeak's exact-zero silences become denormal numbers,
    # which made this step 10-30 times slower.
    resampled = resample_poly(samples.astype(np.float64), SAMPLE_RATE // ratio, ESPEAK_RATE // ratio)
    return resampled.astype(np.float32)


def render_clip(job: ClipJob) -> float:
    """Speak, resample, apply the speaker's gain and noise, write the MP3 atomically; returns seconds of audio."""
    spk = job.speaker
    speech = to_48k(espeak_waveform(job.text, spk.voice, spk.pitch, spk.speed))
    peak = float(np.max(np.abs(speech))) or 1.0
    rng = np.random.default_rng(job.noise_seed)
    lead = np.zeros(int(rng.uniform(0.05, 0.25) * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([lead, speech * (spk.gain / peak)])
    audio += rng.standard_normal(audio.shape[0]).astype(np.float32) * np.float32(10 ** (spk.noise_db / 20))
    np.clip(audio, -1.0, 1.0, out=audio)
    with atomic_open(job.path, "wb") as handle:
        sf.write(handle, audio, SAMPLE_RATE, format="MP3")
    return audio.shape[0] / SAMPLE_RATE


# ---------------------------------------------------------------------------------------------- corpus


def clip_name(lang: str, number: int) -> str:
    return f"common_voice_{lang}_{number}.mp3"


def plan_clips(out_dir: Path, lang: str, speakers: list[Speaker], per_speaker: int, seed: int) -> list[ClipJob]:
    """Which speaker reads which sentence into which file (deterministic for the seed)."""
    grammar = load_grammar(lang)
    wanted = max(per_speaker, math.ceil(len(speakers) * per_speaker / SENTENCE_READINGS))
    pool = sentence_pool(grammar, wanted, seed)
    if len(pool) < per_speaker:
        raise SynthError(
            f"utterances_per_speaker={per_speaker}: the {lang} grammar yields only {len(pool)} distinct sentences; "
            "ask for fewer utterances per speaker"
        )
    jobs = []
    for spk in speakers:
        rng = random.Random(f"fedasr-synth:{seed}:reads:{spk.index}")
        for k, text in enumerate(rng.sample(pool, per_speaker)):
            number = FIRST_CLIP_NUMBER + spk.index * per_speaker + k
            jobs.append(ClipJob(out_dir / "clips" / clip_name(lang, number), text, spk, (seed, spk.index, k)))
    return jobs


def tsv_row(job: ClipJob, lang: str) -> dict[str, str]:
    spk = job.speaker
    return {
        "client_id": spk.client_id,
        "path": job.path.name,
        "sentence_id": hashlib.sha256(job.text.encode("utf-8")).hexdigest(),
        "sentence": job.text,
        "sentence_domain": "",
        "up_votes": "2",
        "down_votes": "0",
        "age": spk.age,
        "gender": spk.gender,
        "accents": spk.accent,
        "variant": "",
        "locale": lang,
        "segment": "",
    }


def write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    """Common Voice TSV: tab-separated, no quoting (sentences hold no tabs or newlines)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(TSV_COLUMNS) + "\n")
        for row in rows:
            handle.write("\t".join(row[c] for c in TSV_COLUMNS) + "\n")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def render_all(jobs: list[ClipJob], workers: int) -> list[float]:
    """Render every clip; threads suffice because espeak-ng runs as a subprocess and libsndfile releases the GIL."""
    if workers <= 1:
        return [render_clip(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render_clip, jobs))


def _check_arguments(lang: str, speakers: int, per_speaker: int, workers: int) -> None:
    if lang not in SUPPORTED_LANGUAGES:
        raise SynthError(f"lang={lang!r}: no sentence material; choose one of {list(SUPPORTED_LANGUAGES)}")
    if per_speaker < 1:
        raise SynthError(f"utterances_per_speaker={per_speaker}: must be at least 1")
    split_sizes(speakers)
    if workers < 1:
        raise SynthError(f"workers={workers}: must be at least 1")
    if shutil.which("espeak-ng") is None:
        raise EspeakError("espeak-ng not found on PATH. Install it (Debian/Ubuntu: apt-get install espeak-ng).")


def synthesize_corpus(
    out_dir: str | os.PathLike,
    *,
    lang: str = "fr",
    speakers: int | None = None,
    utterances_per_speaker: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict:
    """Write a Common-Voice-shaped corpus to ``out_dir``; returns a summary dict.

    Summary keys: lang, seed, speakers, clips, hours, splits ({split: {"speakers", "clips", "hours"}}),
    sentences (distinct), seconds (wall time of this call), skipped (True when the folder was already complete).
    Re-running with the same arguments on a finished folder does nothing; a folder finished with other arguments
    is an error (choose another folder or delete it).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    speakers = DEFAULT_SPEAKERS if speakers is None else int(speakers)
    per_speaker = DEFAULT_UTTERANCES_PER_SPEAKER if utterances_per_speaker is None else int(utterances_per_speaker)
    workers = default_workers() if workers is None else int(workers)
    _check_arguments(lang, speakers, per_speaker, workers)
    fingerprint = {
        "version": SYNTH_VERSION, "lang": lang, "speakers": speakers, "utterances_per_speaker": per_speaker, "seed": seed,
    }
    summary_file = out / "synth_summary.json"
    if is_done(out, STAGE, fingerprint) and summary_file.exists():
        log.info("%s already holds this corpus; nothing to do", out)
        return {**read_json(summary_file), "seconds": round(time.perf_counter() - started, 3), "skipped": True}
    _refuse_other_corpus(out, fingerprint)

    speaker_list = make_speakers(lang, speakers, seed)
    jobs = plan_clips(out, lang, speaker_list, per_speaker, seed)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    log.info("synthesizing %d clips of %d speakers with %d workers -> %s", len(jobs), speakers, workers, out)
    durations = render_all(jobs, workers)

    rows_by_split: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    for job in jobs:
        rows_by_split[job.speaker.split].append(tsv_row(job, lang))
    for split, rows in rows_by_split.items():
        write_tsv(out / f"{split}.tsv", rows)
    write_tsv(out / "validated.tsv", [tsv_row(job, lang) for job in jobs])

    summary = _summary(lang, seed, jobs, durations)
    atomic_write_json(summary_file, summary)
    mark_done(out, STAGE, fingerprint)
    return {**summary, "seconds": round(time.perf_counter() - started, 3), "skipped": False}


def _refuse_other_corpus(out: Path, fingerprint: dict) -> None:
    marker = done_marker(out, STAGE)
    if marker.exists():
        raise SynthError(
            f"{out} already holds a synthetic corpus made with other settings (see {marker}; wanted {fingerprint}). "
            "Choose another folder or delete this one."
        )


def _summary(lang: str, seed: int, jobs: list[ClipJob], durations: list[float]) -> dict:
    splits = {}
    for split in ("train", "dev", "test"):
        picked = [(job, d) for job, d in zip(jobs, durations) if job.speaker.split == split]
        splits[split] = {
            "speakers": len({job.speaker.index for job, _ in picked}),
            "clips": len(picked),
            "hours": round(sum(d for _, d in picked) / 3600, 4),
        }
    return {
        "lang": lang,
        "seed": seed,
        "speakers": len({job.speaker.index for job in jobs}),
        "clips": len(jobs),
        "hours": round(sum(durations) / 3600, 4),
        "sentences": len({job.text for job in jobs}),
        "splits": splits,
    }
