"""Synthetic archives shaped like a real one, for the QIDO-RS benchmark (bench/qido_latency.py).

One deterministic plan (``plan_archive``) describes the archive: ``per_study`` instances per
study split over 2-5 series, patients with 1-5 studies each, names from a list with varied
initials (about 15 % start with "A"), study dates spread over 2019-2023, CT or MR. From it:

* ``catalog``: writes catalog batch files straight in INSTANCE_SCHEMA
  (``<data>/catalog/instances/day=YYYY-MM-DD/<batch>.parquet``, atomic, zstd, as the
  CatalogWriter does), e.g. 1,000,000 rows in 100 files, with a small valid ``header_json``.
  There are no stored files behind these rows: QIDO-RS only, no WADO-RS.
* ``dicom``: writes the same archive as real tiny Part-10 files (64x64 pixels, ~9 KB), to load
  into Orthanc with storescu and into ours with ``vannah import --ingest``.

    .venv/bin/python bench/catalog_synth.py catalog --instances 1000000 --data-dir DIR
    .venv/bin/python bench/catalog_synth.py dicom --instances 100000 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

PLAN_VERSION = 1  # bump when the plan changes: cached archives are keyed by it

# 20 family names, 3 starting with "A" (15 %), the others with varied initials.
LAST_NAMES = (
    "Adams",
    "Allen",
    "Alvarez",
    "Baker",
    "Brooks",
    "Carter",
    "Diaz",
    "Evans",
    "Foster",
    "Garcia",
    "Hughes",
    "Ito",
    "Jensen",
    "Kim",
    "Lopez",
    "Murphy",
    "Nguyen",
    "Okafor",
    "Patel",
    "Schmidt",
)
FIRST_NAMES = (
    "Alex",
    "Maria",
    "Sam",
    "Lee",
    "Noor",
    "Ivan",
    "Ana",
    "Tom",
    "Mei",
    "Omar",
    "Eva",
    "Raj",
    "Lina",
    "Paul",
    "Zoe",
    "Ken",
)
# Studies per patient: 1 (35 %), 2 (25 %), 3 (20 %), 4 (10 %), 5 (10 %); 2.35 on average.
STUDIES_PER_PATIENT = ((1, 2, 3, 4, 5), (35, 25, 20, 10, 10))
FIRST_DAY = date(2019, 1, 1)
DAYS = (date(2023, 12, 31) - FIRST_DAY).days + 1
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
BODY_PART = {"CT": "CHEST", "MR": "BRAIN"}
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TINY_SIZE = 64
BIG_STUDY = 500  # instances of the studies --big-every plans

# The QIDO-RS query kinds the benchmark runs: (label, parameter).
DATE_RANGE = "20210601-20210630"
NAME_PREFIX = "A*"


@dataclass(frozen=True)
class StudyPlan:
    """One planned study: patient, study attributes and its series sizes."""

    index: int
    study_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    modality: str
    series_sizes: tuple[int, ...]

    def series_uid(self, s: int) -> str:
        return f"{self.study_uid}.{s + 1}"

    def sop_uid(self, s: int, i: int) -> str:
        return f"{self.study_uid}.{s + 1}.{i + 1}"


def plan_archive(
    instances: int, per_study: int = 100, seed: int = 1, big_every: int = 0
) -> list[StudyPlan]:
    """The deterministic study plan of an archive of `instances` instances.

    With `big_every` > 0, every `big_every`-th study (the first included) has ``BIG_STUDY``
    instances instead of `per_study` (the WADO-RS metadata benchmark's 500-instance study).
    """
    rng = random.Random(seed)
    if big_every > 0:
        per_group = (big_every - 1) * per_study + BIG_STUDY
        n_studies = max(1, instances * big_every // per_group)
    else:
        n_studies = max(1, instances // per_study)
    studies: list[StudyPlan] = []
    patient = 0
    left = 0
    name = birth = sex = ""
    for index in range(n_studies):
        if left == 0:
            patient += 1
            left = rng.choices(*STUDIES_PER_PATIENT)[0]
            name = f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}"
            birth = (date(1930, 1, 1) + timedelta(days=rng.randrange(365 * 80))).strftime("%Y%m%d")
            sex = rng.choice("FM")
        left -= 1
        n_series = rng.randint(2, 5)
        size = BIG_STUDY if big_every > 0 and index % big_every == 0 else per_study
        base, extra = divmod(size, n_series)
        sizes = tuple(base + (1 if s < extra else 0) for s in range(n_series))
        studies.append(
            StudyPlan(
                index=index,
                # 2.25.<128-bit integer> (PS3.5 B.2); series and SOP UIDs extend it.
                study_uid=f"2.25.{rng.getrandbits(127) | (1 << 126)}",
                patient_id=f"VHC-SYN-{patient:07d}",
                patient_name=name,
                patient_birth_date=birth,
                patient_sex=sex,
                study_date=(FIRST_DAY + timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d"),
                modality="CT" if rng.random() < 0.6 else "MR",
                series_sizes=sizes,
            )
        )
    return studies


@dataclass(frozen=True)
class QueryKind:
    """One QIDO-RS study query and how many studies the plan says it matches."""

    label: str
    params: dict[str, str]
    expected: int


def query_kinds(plan: list[StudyPlan]) -> list[QueryKind]:
    """The three benchmark queries: a patient with exactly one study, one month, ``A*``."""
    per_patient: dict[str, int] = {}
    for study in plan:
        per_patient[study.patient_id] = per_patient.get(study.patient_id, 0) + 1
    # A patient from the middle of the archive, with a single study.
    middle = plan[len(plan) // 2 :] + plan[: len(plan) // 2]
    one = next(
        (s.patient_id for s in middle if per_patient[s.patient_id] == 1), middle[0].patient_id
    )
    low, high = DATE_RANGE.split("-")
    return [
        QueryKind("PatientID (1 patient)", {"PatientID": one}, per_patient[one]),
        QueryKind(
            f"StudyDate {low[:4]}-{low[4:6]}-{low[6:]}..{high[6:]} (1 month)",
            {"StudyDate": DATE_RANGE},
            sum(1 for s in plan if low <= s.study_date <= high),
        ),
        QueryKind(
            f"PatientName={NAME_PREFIX}",
            {"PatientName": NAME_PREFIX},
            sum(1 for s in plan if s.patient_name.startswith(NAME_PREFIX.rstrip("*"))),
        ),
    ]


# --------------------------------------------------------------------------- catalog


def _header_prefix(study: StudyPlan, s: int) -> str:
    """The DICOM JSON of one series' shared attributes (without the closing brace)."""
    m = study.modality

    def attr(tag: str, vr: str, value: object) -> str:
        if vr == "PN":
            return f'"{tag}":{{"vr":"PN","Value":[{{"Alphabetic":{json.dumps(value)}}}]}}'
        return f'"{tag}":{{"vr":"{vr}","Value":[{json.dumps(value)}]}}'

    return "{" + ",".join(
        [
            attr("00080005", "CS", "ISO_IR 100"),
            attr("00080016", "UI", SOP_CLASS[m]),
            attr("00080020", "DA", study.study_date),
            attr("00080030", "TM", "101500"),
            attr("00080050", "SH", f"ACC{study.index:08d}"),
            attr("00080060", "CS", m),
            attr("00080080", "LO", "VannahHealthCloud Synthetic Site"),
            attr("00081030", "LO", f"Synthetic {m} study"),
            attr("0008103E", "LO", f"Synthetic {m} series {s + 1}"),
            attr("00100010", "PN", study.patient_name),
            attr("00100020", "LO", study.patient_id),
            attr("00100030", "DA", study.patient_birth_date),
            attr("00100040", "CS", study.patient_sex),
            attr("00180015", "CS", BODY_PART[m]),
            attr("0020000D", "UI", study.study_uid),
            attr("0020000E", "UI", study.series_uid(s)),
            attr("00200011", "IS", s + 1),
            attr("00280010", "US", TINY_SIZE),
            attr("00280011", "US", TINY_SIZE),
            attr("00280100", "US", 16),
        ]
    )


def write_catalog(data_dir: Path, plan: list[StudyPlan], files: int = 100) -> int:
    """Write the plan's instances as `files` catalog batch files; returns the row count."""
    import pyarrow as pa

    from vannah_pipelines.catalog.compaction import publish
    from vannah_pipelines.catalog.schema import INSTANCE_SCHEMA
    from vannah_pipelines.catalog.writer import CatalogWriter

    writer = CatalogWriter(data_dir / "catalog")
    writer.ensure()
    rng = random.Random(PLAN_VERSION)
    per_file = -(-len(plan) // files)
    rows = 0
    for f in range(files):
        group = plan[f * per_file : (f + 1) * per_file]
        if not group:
            break
        day = date(2024, 1, 1) + timedelta(days=f)
        batch_id = f"{day:%Y%m%d}T000000000000-dimse-1-{f}"
        received = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        cols: dict[str, list[object]] = {name: [] for name in INSTANCE_SCHEMA.names}

        def const(name: str, value: object, n: int, cols: dict[str, list[object]] = cols) -> None:
            cols[name].extend([value] * n)

        for study in group:
            m = study.modality
            for s, n in enumerate(study.series_sizes):
                for name, value in (
                    ("patient_id", study.patient_id), ("patient_name", study.patient_name),
                    ("patient_birth_date", study.patient_birth_date),
                    ("patient_sex", study.patient_sex), ("issuer_of_patient_id", None),
                    ("other_patient_ids", None), ("study_instance_uid", study.study_uid),
                    ("study_date", study.study_date), ("study_time", "101500"),
                    ("accession_number", f"ACC{study.index:08d}"),
                    ("referring_physician_name", "Referring^Doctor"),
                    ("study_description", f"Synthetic {m} study"), ("study_id", "1"),
                    ("series_instance_uid", study.series_uid(s)), ("modality", m),
                    ("series_description", f"Synthetic {m} series {s + 1}"),
                    ("body_part_examined", BODY_PART[m]), ("series_date", study.study_date),
                    ("series_time", "101500"), ("performed_procedure_step_start_date", None),
                    ("performed_procedure_step_start_time", None), ("laterality", None),
                    ("station_name", "SYNTH1"),
                    ("institution_name", "VannahHealthCloud Synthetic Site"),
                    ("manufacturer", "VannahSynthetic"), ("manufacturer_model_name", "Bench"),
                    ("series_number", s + 1), ("sop_class_uid", SOP_CLASS[m]),
                    ("content_date", study.study_date), ("content_time", "101500"),
                    ("acquisition_date", study.study_date), ("acquisition_time", "101500"),
                    ("image_type", "ORIGINAL\\PRIMARY\\AXIAL"),
                    ("photometric_interpretation", "MONOCHROME2"),
                    ("specific_character_set", "ISO_IR 100"), ("number_of_frames", None),
                    ("rows", TINY_SIZE), ("columns", TINY_SIZE), ("bits_allocated", 16),
                    ("transfer_syntax_uid", EXPLICIT_LE), ("size_bytes", 9144),
                    ("tier", "hot"), ("received_at", received), ("indexed_at", received),
                    ("calling_ae", "BENCHSCU"), ("called_ae", "VANNAHCLOUD"),
                    ("peer", "127.0.0.1"), ("source", "dimse"), ("batch_id", batch_id),
                ):  # fmt: skip
                    const(name, value, n)
                sops = [study.sop_uid(s, i) for i in range(n)]
                sums = [f"{rng.getrandbits(256):064x}" for _ in range(n)]
                prefix = _header_prefix(study, s)
                cols["sop_instance_uid"].extend(sops)
                cols["instance_number"].extend(range(1, n + 1))
                cols["checksum"].extend(sums)
                cols["storage_key"].extend(
                    f"{study.study_uid}/{study.series_uid(s)}/{sop}.{c[:16]}.dcm"
                    for sop, c in zip(sops, sums, strict=True)
                )
                cols["header_json"].extend(
                    f'{prefix},"00080018":{{"vr":"UI","Value":["{sop}"]}},'
                    f'"00200013":{{"vr":"IS","Value":[{i + 1}]}}}}'
                    for i, sop in enumerate(sops)
                )
        table = pa.table(cols, schema=INSTANCE_SCHEMA)
        writer.write_batch("instances", day, batch_id, table)
        rows += table.num_rows
    publish(writer.root)
    return rows


# --------------------------------------------------------------------------- files


def write_dicom(out: Path, plan: list[StudyPlan]) -> int:
    """Write the plan's instances as tiny Part-10 files named by position; returns the count.

    Resumable: files already there are kept (a generation cut short continues).
    """
    from vannah_pipelines.dicom.synthetic import make_instance, to_part10

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for study in plan:
        for s, size in enumerate(study.series_sizes):
            for i in range(size):
                path = out / f"{n:07d}.dcm"
                n += 1
                if path.exists():
                    continue
                sop = study.sop_uid(s, i)
                ds = make_instance(
                    study.modality,
                    study_uid=study.study_uid,
                    series_uid=study.series_uid(s),
                    patient_id=study.patient_id,
                    patient_name=study.patient_name,
                    study_date=study.study_date,
                    series_number=s + 1,
                    instance_number=i + 1,
                    rows=TINY_SIZE,
                    columns=TINY_SIZE,
                    SOPInstanceUID=sop,
                    PatientBirthDate=study.patient_birth_date,
                    PatientSex=study.patient_sex,
                    AccessionNumber=f"ACC{study.index:08d}",
                )
                ds.file_meta.MediaStorageSOPInstanceUID = sop
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(to_part10(ds))
                tmp.rename(path)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("catalog", "dicom"):
        p = sub.add_parser(name)
        p.add_argument("--instances", type=int, required=True)
        p.add_argument("--per-study", type=int, default=100)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument(
            "--big-every",
            type=int,
            default=0,
            help=f"every Nth study has {BIG_STUDY} instances (0: none)",
        )
    sub.choices["catalog"].add_argument("--data-dir", type=Path, required=True)
    sub.choices["catalog"].add_argument("--files", type=int, default=100)
    sub.choices["dicom"].add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = plan_archive(args.instances, args.per_study, args.seed, args.big_every)
    started = time.monotonic()
    if args.command == "catalog":
        rows = write_catalog(args.data_dir, plan, args.files)
        what = f"{rows:,} catalog rows in {args.files} files -> {args.data_dir / 'catalog'}"
    else:
        rows = write_dicom(args.out, plan)
        what = f"{rows:,} tiny DICOM files -> {args.out}"
    print(
        f"wrote {what} in {time.monotonic() - started:.1f} s "
        f"({len(plan):,} studies, {len({s.patient_id for s in plan}):,} patients)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
