"""musicbert/monitor.py: append-only log.jsonl history, write errors kept for the loop."""

from __future__ import annotations

import errno
import json

from musicbert.monitor import Monitor


def test_resume_moves_later_lines_aside_and_keeps_the_rest(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)] + [json.dumps({"step": 3, "kind": "val"}), '{"step": 4, "lo']
    (tmp_path / "log.jsonl").write_text("\n".join(lines))  # the last line was cut by a crash
    Monitor(tmp_path, enabled=True, resume_step=2).close()
    assert (tmp_path / "log.jsonl").read_text().splitlines() == lines[:2]
    header, *moved = (tmp_path / "log.rewound.jsonl").read_text().splitlines()
    assert moved == lines[2:]  # nothing dropped, the cut line included, byte for byte
    assert json.loads(header) | {"moved_at": None} == {"kind": "rewound", "resume_step": 2, "moved_at": None, "lines": 3}
    # a second resume appends to the aside file
    m = Monitor(tmp_path, enabled=True, resume_step=2)
    m.log(3, {"loss": 0.5})
    m.close()
    Monitor(tmp_path, enabled=True, resume_step=0).close()
    assert (tmp_path / "log.jsonl").read_text() == ""
    assert (tmp_path / "log.rewound.jsonl").read_text().splitlines()[-3:-1] == lines[:2]


def test_a_failed_write_is_kept_not_raised(tmp_path):
    m = Monitor(tmp_path, enabled=True)
    m._jsonl.close()
    m._jsonl = open("/dev/full", "a", buffering=1)  # every write: ENOSPC
    m.log(1, {"loss": 1.0})
    assert m.error is not None and m.error.errno == errno.ENOSPC and m.error.filename == str(tmp_path / "log.jsonl")
    try:
        m.raise_error()
    except OSError as exc:
        assert exc is m.error
    else:
        raise AssertionError("raise_error did not raise")
    m.close()
