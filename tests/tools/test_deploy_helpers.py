"""The deployment helpers that need no Flower process: progress and process tracking."""

from __future__ import annotations

import json
import subprocess
import time

from dpfl_app.tools.deploy import rounds_done, session_processes


def test_rounds_done_reads_only_the_runs_own_folder(tmp_path):
    for folder, rounds in (("20260101-120000-run12", 3), ("20260101-120500-run123", 1),
                           ("20260101-121000-run5-1", 2)):  # -1: a second folder, same id
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({"rounds": [{}] * rounds}))
    assert rounds_done(tmp_path, 12) == 3
    assert rounds_done(tmp_path, 123) == 1
    assert rounds_done(tmp_path, 5) == 2
    assert rounds_done(tmp_path, 1) == 0
    (tmp_path / "20260101-130000-run7").mkdir()  # the run has started, no round yet
    assert rounds_done(tmp_path, 7) == 0


def test_session_processes_finds_children_whose_parent_was_killed():
    # A parent that starts a child and is then killed, like a SuperNode and its SuperExec.
    parent = subprocess.Popen(["bash", "-c", "sleep 60 & echo $!; wait"], text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    child = int(parent.stdout.readline())
    try:
        assert set(session_processes({parent.pid})) == {parent.pid, child}
        parent.kill()
        parent.wait(timeout=10)
        assert set(session_processes({parent.pid})) == {child}  # orphaned, still found
    finally:
        subprocess.run(["kill", "-9", str(child)], check=False)
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while session_processes({parent.pid}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_processes({parent.pid})
