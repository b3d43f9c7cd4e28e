"""check_writable under concurrency: the ranks of a torchrun job check the same --out folder at
the same moment, and none may see another's probe file vanish."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from avkernels.app.commands.arguments import check_writable


def test_ranks_checking_one_folder_at_once_all_pass(tmp_path):
    folder = tmp_path / "run"

    def check(_):
        for _ in range(200):
            check_writable(folder)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, range(4)))  # re-raises the first CommandError
    assert folder.is_dir() and not any(folder.iterdir())  # no probe file left behind
