"""One exception type for every user-facing failure.

Each message is a single paragraph that says what went wrong and names the fix; `train.py` prints it without a
traceback and exits non-zero. Anything else that escapes is a bug and keeps its traceback.
"""


class AmortlabError(RuntimeError):
    """A user-facing error: bad config, missing/corrupt data, non-finite loss, incompatible options."""


class DatasetNotFoundError(AmortlabError):
    """A dataset file is absent from `data_dir` and was not (or could not be) downloaded."""


class ChecksumError(AmortlabError):
    """A dataset file's sha256 differs from the canonical one."""


class NonFiniteLossError(AmortlabError):
    """The training loss became NaN or infinite."""


class StorageError(AmortlabError):
    """A run directory, checkpoint or record cannot be written (read-only, not a directory, disk full)."""
