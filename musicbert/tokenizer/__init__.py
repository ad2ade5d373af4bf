"""The tokeniser: one MIDI file -> notes -> bars -> REMI+ tokens and per-bar labels, and back.

================= ==================================================================
module            job
================= ==================================================================
``midi``          read a file (mido) into notes: pedal, tempo map, grid quantisation
``remi``          notes -> the kept bars' tokens; tokens -> MIDI (decode)
``chords``        the chord vocabulary and the rule-based chord recogniser
``labels``        the per-bar labels of the kept bars (:mod:`musicbert.label_schema`)
``encode``        one file -> one :class:`musicbert.shards.Song` (all of the above)
``errors``        :class:`~.errors.MidiRejected`: why a file is not used
================= ==================================================================

Nothing here knows about corpora, workers or shard files: that is ``preprocess/``.
This ``__init__`` imports nothing, so that importing one module does not load the others.
"""
