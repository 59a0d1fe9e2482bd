"""Bulk import of a folder or DICOMDIR tree into the landing zone (ingest then indexes it)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vannah_pipelines.dicom.headers import DicomDirError, read_header
from vannah_pipelines.errors import InvalidDicomError
from vannah_pipelines.landing.layout import LandingZone, OpenBatch, ReceiveFacts, iter_files

log = logging.getLogger(__name__)


@dataclass
class ImportSummary:
    """What an import did, file by file for the rejects."""

    accepted: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    modalities: Counter[str] = field(default_factory=Counter)


def list_import_files(root: Path) -> list[Path]:
    """The files an import of `root` (a file or a folder) looks at, sorted."""
    root = Path(root)
    return [root] if root.is_file() else list(iter_files(root))


def import_files(
    files: list[Path],
    zone: LandingZone,
    batch_max_files: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Validate each file's header and land the valid ones, in sealed batches.

    A file that is not DICOM or lacks valid UIDs is rejected with its reason and not
    landed: the caller still has it and the summary says why.
    """
    summary = ImportSummary()
    batch: OpenBatch | None = None

    def seal() -> None:
        nonlocal batch
        if batch is not None:
            sealed = batch.seal()
            if sealed is not None:
                summary.batches.append(sealed.batch_id)
            batch = None

    try:
        for path in files:
            try:
                data = path.read_bytes()
                header = read_header(path, data)
                if batch is None:
                    batch = zone.open_batch("import")
                batch.write_instance(
                    data,
                    ReceiveFacts(
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=str(header.dataset.SOPClassUID),
                        transfer_syntax_uid=header.transfer_syntax_uid,
                        source="import",
                        peer=str(path)[-200:],
                    ),
                )
                summary.accepted += 1
                summary.bytes += len(data)
                summary.modalities[str(header.dataset.get("Modality", "") or "")] += 1
                if batch.count >= batch_max_files:
                    seal()
            except DicomDirError:
                summary.skipped.append((str(path), "DICOMDIR index (its files are imported)"))
            except InvalidDicomError as exc:
                summary.rejected.append((str(path), str(exc)))
            except OSError as exc:
                summary.rejected.append((str(path), f"cannot read: {exc.strerror or exc}"))
            finally:
                if progress is not None:
                    progress(1)
    finally:
        seal()
    return summary
