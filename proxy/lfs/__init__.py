"""LFS objects through the proxy: batch answers rewritten to handles of ours, and the objects served under them."""

from .batch import LfsPolicy, read_batch_answer, rewrite_batch_answer
from .handles import HandleStore, StorageAction
from .objects import DigestCheck, storage_request_headers, storage_url

__all__ = [
    "DigestCheck", "HandleStore", "LfsPolicy", "StorageAction",
    "read_batch_answer", "rewrite_batch_answer", "storage_request_headers", "storage_url",
]  # fmt: skip
