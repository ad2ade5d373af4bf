"""Converters from annotated datasets to label CSVs for ``python -m musicbert.evaluate --labels``.

One module per dataset (``pop909``, ``mma``, ``gmd``), each runnable as
``python -m preprocess.annotations.<name> DATA_DIR --out labels.csv``; :mod:`.labelcsv`
writes the CSV (columns ``path,bar,label``, see :mod:`musicbert.custom_labels`) and
:mod:`.chordnames` spells chord labels the same way for every dataset.
"""
