"""Minimal ctypes driver for eSpeak NG, using the library shipped in the ``espeakng-loader`` wheel.

No system eSpeak and no root access are needed: the shared library and its data directory both
come from the wheel. eSpeak NG keeps all synthesis state in process-wide globals, so there is a
single library instance per process (created on first use, guarded by a lock) shared by every
:class:`ESpeak` object. In multiprocessing code, create the :class:`ESpeak` inside each worker
process (e.g. in a pool initializer).

Reproducibility: eSpeak's wave generator carries hidden state from one utterance to the next and
seeds its noise generator from the clock, so the driver reloads the shared library (about a
millisecond) and reseeds the noise before each utterance: the output is a pure function of the
text, the voice and the seed, whatever was synthesized before and in whichever process.

Audio is produced in synchronous mode: ``espeak_Synth`` calls our callback with chunks of int16
samples, which are accumulated in a Python list and returned as float32 in [-1, 1] at the native
rate of the library (22050 Hz), with long leading/trailing silences trimmed.
"""

from __future__ import annotations

import _ctypes
import ctypes
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from datamodules.corpus.voices import Voice

# --- Constants from speak_lib.h -----------------------------------------------------------------
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
PHONEMES_IPA = 0x02  # espeak_TextToPhonemes: IPA (UTF-8) instead of eSpeak's ASCII mnemonics
ESPEAK_RATE = 1
ESPEAK_VOLUME = 2
ESPEAK_PITCH = 3
ESPEAK_RANGE = 4
EE_OK = 0
# Without this flag a failed initialization calls exit() inside the C library, killing Python.
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000

# Limits accepted by eSpeak for the parameters we set (rate in words per minute, others 0-100).
RATE_RANGE = (80, 450)
PERCENT_RANGE = (0, 100)

# Silence trimming: samples below this absolute level (about -40 dBFS) count as silence, and this
# much of the original silence is kept before the first / after the last non-silent sample.
SILENCE_THRESHOLD = 0.01
SILENCE_MARGIN_S = 0.08

# int (*t_espeak_callback)(short *wav, int numsamples, espeak_EVENT *events); the events array
# ends with an event of type 0 (espeakEVENT_LIST_TERMINATED).
_SYNTH_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
ESPEAK_EVENT_WORD = 1


class _Event(ctypes.Structure):
    """espeak_EVENT of speak_lib.h (the union `id` is 8 bytes: an int, a pointer or char[8])."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position of the word in the text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # samples since the start of the synthesis
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


# --- Process-wide singleton state ---------------------------------------------------------------
_LOCK = threading.Lock()  # serializes every use of the library (its state is global)
# Chunks of int16 samples produced by the current espeak_Synth call (guarded by _LOCK).
_CHUNKS: list[np.ndarray] = []
# (0-based character position, sample) of each word of the current espeak_Synth call.
_WORDS: list[tuple[int, int]] = []


def _on_samples(wav: ctypes.POINTER(ctypes.c_short), numsamples: int, events: int) -> int:
    """Synthesis callback: copy the chunk out of eSpeak's buffer (it is reused after we return)
    and note where each word starts."""
    if numsamples > 0 and wav:
        _CHUNKS.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    if events:
        event = ctypes.cast(events, ctypes.POINTER(_Event))
        i = 0
        while event[i].type != 0:
            if event[i].type == ESPEAK_EVENT_WORD:
                _WORDS.append((event[i].text_position - 1, event[i].sample))
            i += 1
    return 0  # 0 = continue synthesis


# Module-level reference so the ctypes thunk is never garbage collected while the library uses it.
_CALLBACK = _SYNTH_CALLBACK_TYPE(_on_samples)


def espeak_paths() -> tuple[str, str]:
    """Return ``(library_path, data_path)`` from the ``espeakng-loader`` wheel."""
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "eSpeak NG is unavailable: the 'espeakng-loader' package is not installed (pip install espeakng-loader)"
        ) from exc
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def available_languages(data_path: str | None = None) -> list[str]:
    """Names of the English eSpeak voices usable in ``espeak_SetVoiceByName``.

    These are the (lower-cased) file names in ``lang/gmw/en*``: ``en`` (British English),
    ``en-us``, ``en-gb-scotland``, ``en-gb-x-rp``, ... eSpeak matches them case-insensitively.
    Note that the code ``en-gb`` itself is *not* accepted by ``espeak_SetVoiceByName``.
    """
    data_path = data_path or espeak_paths()[1]
    lang_dir = Path(data_path) / "lang" / "gmw"
    return sorted(p.name.lower() for p in lang_dir.glob("en*") if p.is_file())


def available_variants(data_path: str | None = None) -> list[str]:
    """Names of the voice variants (files in ``voices/!v``), usable after ``+`` in a voice name."""
    data_path = data_path or espeak_paths()[1]
    variant_dir = Path(data_path) / "voices" / "!v"
    return sorted(p.name for p in variant_dir.iterdir() if p.is_file())


class _Engine:
    """The loaded library; at most one per process (see :func:`_engine`).

    eSpeak's wave generator keeps state in C ``static`` variables (pitch-cycle phase, flutter and
    echo buffers, ...) that survive between utterances and even ``espeak_Terminate`` +
    ``espeak_Initialize``, so the same text and voice give slightly different audio (and length)
    depending on what was synthesized before. To make every utterance a pure function of
    ``(text, voice)``, :meth:`fresh_library` unloads the shared object (``dlclose``) and loads it
    again, which re-initializes all statics; this costs about a millisecond. The noise generator
    is seeded from the clock at initialization, so it is also reseeded before each utterance.
    """

    def __init__(self) -> None:
        self.lib_path, self.data_path = espeak_paths()
        self.lib: ctypes.CDLL | None = None
        self.set_rand_seed: Any = None  # espeak_ng_SetRandSeed, when the library has it
        self.dirty = False  # True once the loaded library has synthesized something
        self.sample_rate = 0
        self._checked_unload = False
        self._load()

    def _load(self) -> None:
        try:
            lib = ctypes.CDLL(self.lib_path)
        except OSError as exc:
            raise RuntimeError(f"cannot load the eSpeak NG library from {self.lib_path}: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK_TYPE]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # text
            ctypes.c_size_t,  # size in bytes, including the terminating NUL
            ctypes.c_uint,  # position
            ctypes.c_int,  # position type
            ctypes.c_uint,  # end position
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique identifier (unused)
            ctypes.c_void_p,  # user data (unused)
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        # Seeds the generator behind the breath noise of some variants (f2, f3, f5, ...), which is
        # otherwise seeded from the clock at initialization. Added in eSpeak NG 1.52.
        self.set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self.set_rand_seed is not None:
            self.set_rand_seed.argtypes = [ctypes.c_long]
            self.set_rand_seed.restype = None

        # buflength (ms) only sets how often the callback fires; 500 ms keeps Python overhead low.
        sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 500, self.data_path.encode(), ESPEAK_INITIALIZE_DONT_EXIT
        )
        if sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {sample_rate}) with data path {self.data_path}")
        if self.sample_rate and sample_rate != self.sample_rate:
            raise RuntimeError(f"eSpeak sample rate changed from {self.sample_rate} to {sample_rate}")
        lib.espeak_SetSynthCallback(_CALLBACK)
        self.lib, self.sample_rate, self.dirty = lib, sample_rate, False

    def _unload(self) -> None:
        lib, self.lib = self.lib, None
        if lib is None:
            return
        lib.espeak_Terminate()
        handle = lib._handle
        del lib
        _ctypes.dlclose(handle)
        if not self._checked_unload:
            self._checked_unload = True
            if _is_mapped(self.lib_path):
                warnings.warn(
                    "libespeak-ng stays loaded after dlclose (another module holds it?): "
                    "synthesized audio may depend on earlier utterances and not be reproducible",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def fresh_library(self) -> ctypes.CDLL:
        """Return the library with pristine internal state, reloading it if it has been used."""
        if self.lib is None or self.dirty:
            self._unload()
            self._load()
        assert self.lib is not None
        return self.lib


_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    """The process-wide engine, created on first use; must be called with ``_LOCK`` held."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def _is_mapped(path: str) -> bool:
    """Whether a file is still mapped into this process (Linux only; False elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return str(Path(path).resolve()) in maps or path in maps


def loud_bounds(
    audio: np.ndarray,
    sample_rate: int,
    threshold: float = SILENCE_THRESHOLD,
    margin_s: float = SILENCE_MARGIN_S,
) -> tuple[int, int]:
    """``(start, end)`` of ``audio`` without its leading/trailing silence, keeping ``margin_s``
    of it on each side (when present). Raises ``ValueError`` if the audio is all silence."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        raise ValueError("audio contains only silence")
    margin = round(margin_s * sample_rate)
    return max(0, int(loud[0]) - margin), min(audio.shape[0], int(loud[-1]) + 1 + margin)


def trim_silence(
    audio: np.ndarray,
    sample_rate: int,
    threshold: float = SILENCE_THRESHOLD,
    margin_s: float = SILENCE_MARGIN_S,
) -> np.ndarray:
    """Cut leading/trailing silence, keeping ``margin_s`` of it on each side (when present).

    Raises ``ValueError`` if no sample exceeds ``threshold`` (the audio is all silence).
    """
    start, end = loud_bounds(audio, sample_rate, threshold, margin_s)
    return audio[start:end]


class ESpeak:
    """Text-to-speech with eSpeak NG.

    All instances share the single, process-wide library; creating the first one loads and
    initializes it and raises ``RuntimeError`` if that fails. Each :meth:`synthesize` call starts
    from a freshly loaded library, so its output depends only on ``(text, voice)`` (see
    :class:`_Engine`); pass ``reproducible=False`` to skip the reload.
    """

    def __init__(self, reproducible: bool = True) -> None:
        with _LOCK:
            engine = _engine()
        self._reproducible = reproducible
        self._sample_rate = engine.sample_rate
        self._languages = set(available_languages(engine.data_path))
        self._variants = set(available_variants(engine.data_path))

    @property
    def sample_rate(self) -> int:
        """Native output sample rate of the synthesizer (22050 Hz for eSpeak NG)."""
        return self._sample_rate

    def check_voice(self, voice: Voice) -> None:
        """Raise ``ValueError`` if the voice's language or variant is not in the eSpeak data."""
        # eSpeak silently ignores an unknown variant, so both parts are checked here.
        language, _, variant = voice.espeak_name.partition("+")
        if language.lower() not in self._languages:
            raise ValueError(
                f"unknown eSpeak language {voice.language!r} for voice {voice.voice_id!r}; "
                f"available English voices: {', '.join(sorted(self._languages))}"
            )
        if variant and variant not in self._variants:
            # List the plain numbered variants (m1, f1, ...) first: they are the useful ones.
            ranked = sorted(self._variants, key=lambda v: (not v[1:].isdigit(), v))
            raise ValueError(
                f"unknown eSpeak voice variant {variant!r} for voice {voice.voice_id!r}; "
                f"available variants include: {', '.join(ranked[:16])}, ..."
            )

    def synthesize(self, text: str, voice: Voice, seed: int = 0) -> np.ndarray:
        """Speak ``text`` with ``voice``; return mono float32 samples in [-1, 1] at 22050 Hz.

        ``seed`` seeds eSpeak's noise generator (used by breathy variants), so the same
        ``(text, voice, seed)`` always gives the same samples.

        Leading/trailing silence longer than ~80 ms is trimmed. Raises ``ValueError`` for empty
        text or an unknown voice and ``RuntimeError`` if eSpeak fails or produces no audio.
        """
        return self.synthesize_words(text, voice, seed)[0]

    def synthesize_words(self, text: str, voice: Voice, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """`synthesize`, and where each word starts: ``(audio, [(character index in text, sample
        index in audio)])``, the samples clipped to the trimmed audio (a word that starts in the
        cut leading silence starts at 0).
        """
        if not text or not text.strip():
            raise ValueError("cannot synthesize empty text")
        self.check_voice(voice)
        encoded = text.encode("utf-8")
        with _LOCK:
            engine = _engine()
            lib = engine.fresh_library() if self._reproducible else engine.lib
            assert lib is not None
            engine.dirty = True
            if engine.set_rand_seed is not None:
                engine.set_rand_seed(seed)
            rc = lib.espeak_SetVoiceByName(voice.espeak_name.encode())
            if rc != EE_OK:
                raise RuntimeError(f"espeak_SetVoiceByName({voice.espeak_name!r}) failed ({rc})")
            # Set every parameter on every call: they persist in the library between calls and
            # a voice change does not reset all of them.
            self._set_parameter(lib, ESPEAK_RATE, voice.rate_wpm, RATE_RANGE)
            self._set_parameter(lib, ESPEAK_PITCH, voice.pitch, PERCENT_RANGE)
            self._set_parameter(lib, ESPEAK_RANGE, voice.pitch_range, PERCENT_RANGE)
            self._set_parameter(lib, ESPEAK_VOLUME, 100, (0, 200))
            _CHUNKS.clear()
            _WORDS.clear()
            try:
                buf = ctypes.create_string_buffer(encoded)  # NUL-terminated copy
                rc = lib.espeak_Synth(buf, len(encoded) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
                if rc != EE_OK:
                    raise RuntimeError(f"espeak_Synth failed ({rc}) for text {text[:60]!r}")
                lib.espeak_Synchronize()
                chunks, words = list(_CHUNKS), list(_WORDS)
            finally:
                _CHUNKS.clear()
                _WORDS.clear()

        if not chunks:
            raise RuntimeError(f"eSpeak produced no audio for {text[:60]!r} with voice {voice.espeak_name!r}")
        audio = np.concatenate(chunks).astype(np.float32) / 32768.0
        try:
            start, end = loud_bounds(audio, self._sample_rate)
        except ValueError as exc:
            raise RuntimeError(
                f"eSpeak produced only silence for {text[:60]!r} with voice {voice.espeak_name!r}"
            ) from exc
        words = [(char, min(max(sample - start, 0), end - start)) for char, sample in words]
        return audio[start:end], words

    def phonemes(self, text: str, voice: Voice) -> str:
        """eSpeak's IPA phonemes of ``text`` in ``voice``'s language (words separated by spaces,
        stress marks included; "" for text it does not pronounce, such as punctuation)."""
        self.check_voice(voice)
        out = []
        with _LOCK:
            engine = _engine()
            lib = engine.lib if engine.lib is not None else engine.fresh_library()
            engine.dirty = True
            rc = lib.espeak_SetVoiceByName(voice.espeak_name.encode())
            if rc != EE_OK:
                raise RuntimeError(f"espeak_SetVoiceByName({voice.espeak_name!r}) failed ({rc})")
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            ptr = ctypes.c_void_p(ctypes.addressof(buf))
            while ptr.value:  # one clause per call; the pointer moves on (NULL at the end)
                piece = lib.espeak_TextToPhonemes(ctypes.byref(ptr), ESPEAK_CHARS_UTF8, PHONEMES_IPA)
                if piece:
                    out.append(piece.decode("utf-8", errors="replace"))
        return " ".join(p for p in out if p.strip())

    @staticmethod
    def _set_parameter(lib: ctypes.CDLL, param: int, value: int, bounds: tuple[int, int]) -> None:
        low, high = bounds
        if not low <= value <= high:
            raise ValueError(f"eSpeak parameter {param} value {value} outside [{low}, {high}]")
        rc = lib.espeak_SetParameter(param, int(value), 0)
        if rc != EE_OK:
            raise RuntimeError(f"espeak_SetParameter({param}, {value}) failed ({rc})")


def assistant_speech(text: str, sample_rate: int = 24000, tts: ESpeak | None = None) -> np.ndarray:
    """``text`` in the fixed assistant voice (the TTS split's voice), float32 at ``sample_rate``."""
    from datamodules.audio import resample
    from datamodules.corpus.voices import ASSISTANT_VOICE

    tts = tts or ESpeak()
    return resample(tts.synthesize(text, ASSISTANT_VOICE), tts.sample_rate, sample_rate)
