"""Why a MIDI file is not used: :class:`MidiRejected` carries a short ``reason`` category.

Every file that the preprocessor finds but does not turn into a song gets one line in
``errors.jsonl`` with its ``path`` (relative to ``--src``), a ``reason`` from
:data:`REASONS` and a human ``message``.
"""

from __future__ import annotations

#: reason -> what it means (the README lists the same table).
REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "not_midi": "no MThd header at the start of the file",
    "too_large": "file size or note count above the configured limit (bounded memory)",
    "too_long": "the song spans more bars than the limit (often one stray event far after the music)",
    "unreadable": "mido could not parse the file (truncated, corrupt, bad meta event, ...)",
    "bad_timing": "ticks per beat is zero or SMPTE time division (no musical beat grid)",
    "not_4_4": "a time-signature event other than 4/4 (a file without any counts as 4/4)",
    "no_notes": "the file has no notes",
    "too_few_bars": "no bar has 30 or more tokens (about 6 notes), so nothing is kept",
    "out_of_memory": "the worker ran out of its memory limit on this file",
    "timeout": "the file took longer than the per-file time limit (the worker was killed)",
    "worker_crashed": "the worker process died on this file (segfault, OOM kill, ...)",
    "error": "an unexpected exception in the preprocessor itself (a bug; message has the details)",
}


class MidiRejected(Exception):
    """A file is not used; ``reason`` is a key of :data:`REASONS`, ``message`` says why exactly."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across the worker pipe
        return (type(self), (self.reason, self.message))
