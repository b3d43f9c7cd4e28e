"""``avkernels.files.atomic_write``: the one atomic file write every writer of the package uses."""

from __future__ import annotations

import os

import pytest

from avkernels.files import atomic_write, atomic_write_text


def test_writes_creating_folders_with_the_permissions_of_open(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "out.txt", "héllo\r\n")
    assert path.read_bytes() == "héllo\r\n".encode()
    (tmp_path / "reference.txt").write_text("x")
    assert os.stat(path).st_mode == os.stat(tmp_path / "reference.txt").st_mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_crash_mid_write_keeps_the_old_file_and_leaves_no_partial_file(tmp_path):
    path = atomic_write_text(tmp_path / "out.bin", "old")

    def crash(file):
        file.write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"], "nothing half-written"
