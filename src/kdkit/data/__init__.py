"""Training rows: formats, tokenisation, loss masks, roles, tasks and weights, collation and packing
(``rows``), read from JSONL files or Hugging Face datasets (``files``)."""

from kdkit.data.files import read_objects
from kdkit.data.rows import Batch, DataError, TokenizedRow, collate, data_fingerprint, read_examples, tokenize_rows

__all__ = ["TokenizedRow", "Batch", "DataError", "read_examples", "tokenize_rows", "collate", "data_fingerprint",
           "read_objects"]
