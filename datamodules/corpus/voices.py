"""Synthetic speaker inventory for the eSpeak NG corpus.

A :class:`Voice` is one eSpeak configuration: an English accent (eSpeak "language", e.g. ``en-us``
or ``en-gb-scotland``), a voice variant from ``espeak-ng-data/voices/!v`` (``m1``..``m7``,
``f1``..``f5``, which set the timbre: formants, base pitch, breathiness), a speaking rate and a
pitch/pitch-range setting. :func:`build_voices` draws disjoint train/dev/test voice sets from a
seed. Every voice uses its own (accent, variant) pair, so a dev/test voice differs from every
training voice in its whole configuration and not only in rate or pitch. Joke or degraded
variants ("Demonic", "croak", "whisper", robots, ...) are never used so that speech stays
intelligible.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

# Language codes whose eSpeak voice file has another name (``espeak_SetVoiceByName`` wants it).
ESPEAK_LANGUAGE_ALIASES: dict[str, str] = {"en-gb": "en"}

# English accents of eSpeak NG (the Shavian-script ``en-shaw`` is deliberately left out).
LANGUAGES: tuple[str, ...] = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
MALE_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS: tuple[str, ...] = ("f1", "f2", "f3", "f4", "f5")
VARIANTS: tuple[str, ...] = MALE_VARIANTS + FEMALE_VARIANTS

# Prosody ranges (inclusive). eSpeak's defaults are 175 wpm, pitch 50, range 50; pitch is relative
# to the variant's own base pitch, so the same range suits male and female variants.
RATE_WPM = (140, 190)
PITCH = (35, 70)
PITCH_RANGE = (35, 75)

SPLITS: tuple[str, ...] = ("train", "dev", "test")
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 16, "dev": 4, "test": 4}


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: eSpeak accent + variant + prosody settings."""

    voice_id: str
    language: str  # eSpeak language code, e.g. "en-us"
    variant: str  # eSpeak voice variant, e.g. "f3" ("" for the accent's default voice)
    rate_wpm: int = 175
    pitch: int = 50  # 0-100
    pitch_range: int = 50  # 0-100

    @property
    def espeak_name(self) -> str:
        """Name for ``espeak_SetVoiceByName``, e.g. ``"en-us+f3"``.

        eSpeak selects voices by file name, and British English lives in the file ``en``, so the
        code ``en-gb`` is mapped to it.
        """
        language = ESPEAK_LANGUAGE_ALIASES.get(self.language, self.language)
        return f"{language}+{self.variant}" if self.variant else language

    @property
    def gender(self) -> str:
        """``"male"``/``"female"`` from the variant name (``"unknown"`` otherwise)."""
        if self.variant.startswith("m"):
            return "male"
        if self.variant.startswith("f"):
            return "female"
        return "unknown"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Voice:
        """Build a voice from :meth:`to_dict` output (extra keys are ignored)."""
        fields = ("voice_id", "language", "variant", "rate_wpm", "pitch", "pitch_range")
        return cls(**{k: data[k] for k in fields if k in data})


# The fixed voice of the assistant (speech output). Its (accent, variant) pair is excluded from the
# pool that user voices are drawn from, so it never coincides with a train/dev/test user voice.
ASSISTANT_VOICE = Voice(voice_id="assistant", language="en-us", variant="f2", rate_wpm=170, pitch=55, pitch_range=55)


def _prosody(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(*RATE_WPM), rng.randint(*PITCH), rng.randint(*PITCH_RANGE)


def _balanced_variants(rng: random.Random, n: int) -> list[str]:
    """``n`` variants, as gender-balanced and as varied as possible (distinct while supplies last)."""
    n_female = n // 2
    n_male = n - n_female
    male = list(MALE_VARIANTS)
    female = list(FEMALE_VARIANTS)
    rng.shuffle(male)
    rng.shuffle(female)
    # Cycle through a shuffled list so that each variant is used once before any repeats.
    chosen = [male[i % len(male)] for i in range(n_male)]
    chosen += [female[i % len(female)] for i in range(n_female)]
    rng.shuffle(chosen)
    return chosen


def build_voices(seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[Voice]]:
    """Draw disjoint ``train``/``dev``/``test`` voice lists (deterministic given ``seed``).

    ``sizes`` gives the number of voices per split (default 16/4/4). Each voice has a unique
    (accent, variant) pair, so no dev/test voice configuration appears in training; the training
    set covers every variant and every accent when it is large enough. Splits are gender
    balanced. Voice ids look like ``train-03-en-gb-scotland-m2``.
    """
    sizes = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected a subset of {SPLITS}")
    assistant_pair = (ASSISTANT_VOICE.language, ASSISTANT_VOICE.variant)
    n_pairs = len(LANGUAGES) * len(VARIANTS) - 1  # minus the assistant's pair
    if sum(sizes.values()) > n_pairs:
        raise ValueError(f"at most {n_pairs} distinct voices are available, asked for {sizes}")

    rng = random.Random(f"voices:{seed}")
    used: set[tuple[str, str]] = {assistant_pair}
    voices: dict[str, list[Voice]] = {}
    for split in SPLITS:
        n = sizes.get(split, 0)
        variants = _balanced_variants(rng, n)
        # Spread accents evenly too: cycle through a shuffled accent list.
        accents = list(LANGUAGES)
        rng.shuffle(accents)
        split_voices: list[Voice] = []
        for i, variant in enumerate(variants):
            # Prefer the next accent in the cycle; if that pair is taken, try the others in order.
            order = accents[i % len(accents) :] + accents[: i % len(accents)]
            language = next((lang for lang in order if (lang, variant) not in used), None)
            if language is None:
                # Every accent is taken for this variant: fall back to any free pair.
                free = [(lg, v) for lg in LANGUAGES for v in VARIANTS if (lg, v) not in used]
                language, variant = rng.choice(free)
            used.add((language, variant))
            rate, pitch, pitch_range = _prosody(rng)
            split_voices.append(
                Voice(
                    voice_id=f"{split}-{i:02d}-{language}-{variant}",
                    language=language,
                    variant=variant,
                    rate_wpm=rate,
                    pitch=pitch,
                    pitch_range=pitch_range,
                )
            )
        voices[split] = split_voices
    return voices


def voices_to_json(voices: dict[str, list[Voice]]) -> dict[str, Any]:
    """JSON-serializable description of a voice inventory (plus the assistant voice)."""
    return {
        "assistant": ASSISTANT_VOICE.to_dict(),
        **{split: [v.to_dict() for v in vs] for split, vs in voices.items()},
    }
