"""The corpus job: every MIDI file under a folder -> WebDataset shards (``python -m preprocess``).

File discovery and the run (``run``), the worker pool (``pool``, ``reorder``, ``spill``),
shard and manifest writing (``shards``), the CLI (``__main__``) and converters of annotated
datasets into label CSVs (``annotations``). Each file is tokenised by :mod:`musicbert.tokenizer`;
the library never imports this package.
"""
