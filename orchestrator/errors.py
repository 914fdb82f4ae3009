"""Typed exceptions. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(OrchestratorError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class DataError(OrchestratorError):
    """Input data cannot be read or is not in the expected format."""


class RecordError(DataError):
    """One bad record: where it is, which field, what was expected."""

    def __init__(self, origin: str, field: str, expected: str, got: object = None):
        self.origin = origin
        self.field = field
        self.expected = expected
        self.got = got
        shown = "" if got is None else f", got {_short(got)}"
        super().__init__(f"{origin}: field '{field}': expected {expected}{shown}")


class DataValidationError(DataError):
    """Several bad records found while validating a data source before training."""

    def __init__(self, errors: list[RecordError], total: int, per_file: dict[str, int] | None = None):
        self.errors = errors
        self.total = total
        self.per_file = dict(per_file or {})
        listed = "\n".join(f"  - {e}" for e in errors)
        more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
        files = ("\n  bad records per file: " + ", ".join(f"{name}: {count}" for name, count in sorted(self.per_file.items()))
                 if self.per_file else "")
        super().__init__(
            f"{total} bad record(s); fix them or set data.bad_records=skip to drop them:\n{listed}{more}{files}"
        )


class StorageError(OrchestratorError):
    """A path or URI cannot be reached, read or written (after the storage client's retries)."""


class CheckpointError(OrchestratorError):
    """A checkpoint is missing, incomplete or does not match the run."""


class DeploymentError(OrchestratorError):
    """Deployment files cannot be checked at all (missing CRDs, kustomize failing); bad fields are reported
    as problems instead."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
