"""MusicBERT: pre-training and probing BERT encoders on bar-level REMI+ tokens."""

from musicbert.vocab import VOCAB, Vocab

__all__ = ["VOCAB", "Vocab"]
