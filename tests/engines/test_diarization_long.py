"""Long audio: the diarizer reads its windows in batches, with the same segments and bounded memory.

``tests/data/diarization/batch_segments.json`` holds the segments the diarizer gave when it cut
every window, piece and mel partial of the audio at once (commit 246cca1): for each fixture, for
the three fixtures back to back (86 s, 17 windows), and for that audio with ``batch_size=3`` and
``embedding_batch_size=7``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import uniopt
from uniopt.engines.diarization import Diarizer

from .test_diarization_der import FIXTURES, load, pytestmark  # noqa: F401 - the module's skip condition

DATA = Path(__file__).resolve().parents[1] / "data" / "diarization"
SR = 16_000
MAX_PEAK_MB = 700
#: Ten minutes of audio held at once used to add about 1.1 GB; a batch at a time adds about 200 MB.
MAX_DIARIZE_INCREASE_MB = 300

#: Diarize ``argv[2]`` seconds of the fixtures (argv[1]) tiled; print the peak RSS (MB) before and after.
_LONG_AUDIO = """
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from uniopt.engines.diarization import Diarizer


def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


data, seconds = Path(sys.argv[1]), float(sys.argv[2])
names = ("two_speakers", "three_speakers", "four_speakers")
one = np.concatenate([sf.read(data / f"{name}.wav", dtype="float32")[0] for name in names])
audio = np.tile(one, int(np.ceil(seconds * 16000 / one.size)))[: int(seconds * 16000)]
del one
diarizer = Diarizer()
before = peak_mb()
segments = diarizer.diarize(audio, 16000)
print(before, peak_mb(), len(segments), len({s.speaker for s in segments}))
"""


@pytest.fixture(scope="module")
def diarizer() -> Diarizer:
    return Diarizer()


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[list]]:
    return json.loads((DATA / "batch_segments.json").read_text())


def as_lists(segments) -> list[list]:
    return [[s.start_s, s.end_s, s.speaker] for s in segments]


@pytest.mark.parametrize("name", FIXTURES)
def test_segments_are_those_of_all_windows_at_once(diarizer: Diarizer, recorded: dict, name: str) -> None:
    assert as_lists(diarizer.diarize(load(name)[0], SR)) == recorded[name]


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.inner(x)


@pytest.mark.parametrize(
    ("batch_size", "embedding_batch_size", "key"), [(8, 32, "all_three"), (3, 7, "all_three_small_batches")]
)
def test_many_batches_give_the_recorded_segments_in_full_batches(
    diarizer: Diarizer, recorded: dict, batch_size: int, embedding_batch_size: int, key: str
) -> None:
    audio = np.concatenate([load(name)[0] for name in FIXTURES])
    segmentation, embedding = _Counting(diarizer.segmentation), _Counting(diarizer.embedding)
    engine = Diarizer(segmentation, embedding, batch_size=batch_size, embedding_batch_size=embedding_batch_size)
    assert as_lists(engine.diarize(audio, SR)) == recorded[key]
    windows = len(engine._starts(audio.size))
    assert segmentation.batches == [batch_size] * (windows // batch_size) + [windows % batch_size] * (
        windows % batch_size > 0
    )
    # Partials cross window batches: every call but the last embeds a full batch.
    assert len(embedding.batches) > 2 and set(embedding.batches[:-1]) == {embedding_batch_size}
    assert 0 < embedding.batches[-1] <= embedding_batch_size


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux only)")
def test_ten_minutes_stay_under_600_mb() -> None:
    src = str(Path(uniopt.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-c", _LONG_AUDIO, str(DATA), "600"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": src},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    before, peak, segments, speakers = result.stdout.split()
    print(f"10 min of audio: peak RSS {float(peak):.0f} MB ({float(before):.0f} MB before diarize)")
    assert int(segments) > 100 and int(speakers) >= 4
    # What diarize itself holds at its peak, and the process's peak. The process's baseline depends
    # on the install (a fresh CI venv measured 392 MB before diarize where a used one has 331).
    assert float(peak) - float(before) < MAX_DIARIZE_INCREASE_MB, f"diarize added {float(peak) - float(before):.0f} MB"
    assert float(peak) < MAX_PEAK_MB, f"peak RSS {float(peak):.0f} MB"
