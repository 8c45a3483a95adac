"""LFS objects through the proxy: batch answers rewritten to handles of ours, and the objects served under them."""

from .batch import LfsPolicy, read_batch_answer, rewrite_batch_answer
from .handles import HandleRefused, HandleStore, StorageAction
from .objects import DigestCheck, StorageRefused, storage_request_headers, storage_url

__all__ = [
    "DigestCheck", "HandleRefused", "HandleStore", "LfsPolicy", "StorageAction", "StorageRefused",
    "read_batch_answer", "rewrite_batch_answer", "storage_request_headers", "storage_url",
]  # fmt: skip
