"""A rank that raises (or hangs) ends the whole torchrun job, with the error on every rank."""
import json

from conftest import torchrun

TIMEOUT_S = 20


def test_failing_rank_stops_every_rank_with_its_error(tmp_path):
    proc, _ = torchrun(["fail", "-", str(tmp_path)], env={"RLPT_TEST_TIMEOUT_S": str(TIMEOUT_S)})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "[rank 1] failed: ValueError: deliberate failure on rank 1" in out
    assert "[rank 0] rank 0 stops because rank 1: ValueError: deliberate failure on rank 1" in out
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["error"].startswith("RankFailedError: rank 0 stops because rank 1: ValueError")
    assert r0["seconds"] < TIMEOUT_S  # gloo sees the closed connection: no wait for the timeout


def test_hung_rank_ends_the_job_at_the_collective_timeout(tmp_path):
    proc, seconds = torchrun(["hang", "-", str(tmp_path)], env={"RLPT_TEST_TIMEOUT_S": "4"})
    assert proc.returncode != 0
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert "no rank recorded an error: a peer hung" in r0["error"]
    assert 3.5 < r0["seconds"] < 30
    assert seconds < 90  # the hung rank (sleeping 300 s) was stopped, not waited for
