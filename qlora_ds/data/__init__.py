"""Training data: records from JSON/JSONL/text files, response-only tokenization, group-by-length batches."""
from .batching import GroupByLengthBatches, collate
from .records import load_records
from .tokenize import tokenize_records

__all__ = ["GroupByLengthBatches", "collate", "load_records", "tokenize_records"]
