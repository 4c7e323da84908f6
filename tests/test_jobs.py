"""llm2clip.jobs.Job: record first, parts atomic, manifest last; resume, refuse or restart."""

from __future__ import annotations

import json

import pytest

from llm2clip.errors import ConfigError, InputError
from llm2clip.fileio import JOB_RECORD, TMP_MARK
from llm2clip.jobs import VERSION, Job


def test_new_job_writes_its_record_first_and_resumes_with_the_same_one(tmp_path):
    job = Job(tmp_path / "out", "demo", "manifest.json")
    seen = []
    assert job.open({"a": 1}, prepare=lambda: seen.append(job.record_path.exists())) == "new"
    assert seen == [False]  # prepare runs before the record exists
    assert json.loads(job.record_path.read_text()) == {"kind": "demo", "version": VERSION, "a": 1}
    assert job.write_part("p0", b"x") and job.has_part("p0") and not job.is_complete()
    (job.folder / f".p1{TMP_MARK}77").write_bytes(b"half")  # a write cut by a kill
    assert Job(tmp_path / "out", "demo", "manifest.json").open({"a": 1}) == "resume"
    assert sorted(p.name for p in job.folder.iterdir()) == [JOB_RECORD, "p0"]


def test_complete_writes_the_manifest_last_and_drops_record_and_scratch(tmp_path):
    job = Job(tmp_path, "demo", "manifest.json")
    job.open({})
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "c0").write_bytes(b"x")
    job.write_part("plan.txt", b"plan")
    job.write_part("keep", b"k")
    job.complete(b"{}\n", scratch=["chunks", "plan.txt"])
    assert job.is_complete() and sorted(p.name for p in tmp_path.iterdir()) == ["keep", "manifest.json"]


def test_mismatch_is_refused_or_restarted(tmp_path):
    Job(tmp_path / "j", "demo", "m.json").open({"a": 1, "b": 2})
    (tmp_path / "j" / "part").write_bytes(b"x")
    with pytest.raises(ConfigError, match="other settings \\(b\\)"):
        Job(tmp_path / "j", "demo", "m.json").open({"a": 1, "b": 3})

    def check(where, have, want):
        raise InputError(f"{where}: custom {sorted(have)}")

    with pytest.raises(InputError, match="custom \\['a', 'b'\\]"):
        Job(tmp_path / "j", "demo", "m.json").open({"a": 1}, check=check)
    with pytest.raises(ConfigError, match="not a 'other' job"):
        Job(tmp_path / "j", "other", "m.json").open({"a": 1, "b": 2})
    assert Job(tmp_path / "j", "demo", "m.json").open({"a": 5}, restart=True) == "new"
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == [JOB_RECORD]


def test_foreign_or_broken_folders(tmp_path):
    (tmp_path / "mine.txt").write_text("not a job")
    with pytest.raises(InputError, match="custom message"):
        Job(tmp_path, "demo", "m.json", error=InputError).open({}, not_empty="custom message")
    assert (tmp_path / "mine.txt").exists()
    (tmp_path / JOB_RECORD).write_text("{cut")
    with pytest.raises(InputError, match="unreadable job record"):
        Job(tmp_path, "demo", "m.json", error=InputError).open({})
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / JOB_RECORD).write_text("[]")
    assert Job(sub, "demo", "m.json").open({"a": 1}, restart=True) == "new"
