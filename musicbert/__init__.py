"""MusicBERT: pre-training and probing BERT encoders on bar-level REMI+ tokens.

The map, in the order data flows through it:

- ``tokenizer/``: MIDI -> notes -> bars -> REMI+ tokens and per-bar labels, and back.
- ``vocab``, ``label_schema``: the only place token strings meet ids; the labels, declared once.
- ``shards``, ``shard_reader``: the shard format (what ``preprocess`` writes) and reading it.
- ``batch``, ``packing``, ``data``: packed batches streamed from the shards (pair views from
  ``objectives``).
- ``model``, ``attention``, ``masking``, ``objectives``, ``contrastive``: the encoder and its losses.
- ``train_step``, ``validation``, ``meter``, ``monitor``, ``checkpoint``, ``run_lock``,
  ``schedule``, ``distributed``, ``config``: what ``train_ddp.py`` is built from.
- ``inference``, ``feature_store``, ``probes/``, ``custom_labels``, ``evaluate``, ``report``:
  bar embeddings and the probing metrics; ``api``, ``embed``: embeddings of any MIDI file;
  ``study``, ``study_report``: the four objectives compared.

Nothing here imports ``preprocess`` (the corpus job built on this library).
"""

from musicbert.vocab import VOCAB, Vocab

__all__ = ["VOCAB", "Vocab"]
