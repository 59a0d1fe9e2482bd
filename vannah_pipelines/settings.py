"""The one settings object: a JSON config file plus ``VANNAH_*`` environment overrides.

The file may use the Orthanc-style keys of the product documentation verbatim
(``DicomAet``, ``DicomPort``, ``RemoteAccessAllowed``, ``AuthenticationEnabled``,
``DicomTlsEnabled``) or the snake_case field names. Precedence: explicit arguments, then
``VANNAH_*`` environment variables, then the file, then the defaults.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from vannah_pipelines.errors import ConfigError

# Orthanc-style keys (product documentation) -> our field names.
ORTHANC_KEYS: dict[str, str] = {
    "DicomAet": "dicom_aet",
    "DicomPort": "dicom_port",
    "RemoteAccessAllowed": "remote_access_allowed",
    "AuthenticationEnabled": "authentication_enabled",
    "DicomTlsEnabled": "dicom_tls_enabled",
    "rules": "routing_rules",
    "DicomModalities": "dicom_modalities",
}

# Accepted and documented, but refused when switched on until the feature exists.
NOT_YET_IMPLEMENTED: dict[str, str] = {
    "authentication_enabled": "AuthenticationEnabled: authentication is not implemented yet; "
    "set it to false (or omit it) and keep the services on loopback",
    "dicom_tls_enabled": "DicomTlsEnabled: DICOM TLS is not implemented yet; set it to false "
    "(or omit it) and terminate TLS in front of the receiver",
}

_config_file: ContextVar[Path | None] = ContextVar("vannah_config_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """Values from the JSON config file named by load_settings()."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns everything at once

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path is not None else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON config file and map Orthanc-style keys to field names.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not a JSON object, or names a key twice.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = ORTHANC_KEYS.get(str(key), str(key))
        if name in values:
            raise ConfigError(f"config file {path} sets {name!r} twice (as {key!r})")
        values[name] = value
    return values


class RemoteModality(BaseModel):
    """A known DICOM peer (a C-MOVE destination): AE title, host and port."""

    model_config = ConfigDict(frozen=True)

    aet: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


def _modality(name: str, value: Any) -> Any:
    """Orthanc's ``DicomModalities`` entry: ``["AET", "host", port(, manufacturer)]`` or
    ``{"AET": ..., "Host": ..., "Port": ...}`` (other Orthanc keys are ignored)."""
    if isinstance(value, list | tuple):
        if len(value) < 3:
            raise ValueError(f"DicomModalities.{name}: expected [AET, host, port]")
        return {"aet": value[0], "host": value[1], "port": value[2]}
    if isinstance(value, dict):
        lower = {str(k).lower(): v for k, v in value.items()}
        return {"aet": lower.get("aet"), "host": lower.get("host"), "port": lower.get("port")}
    return value


class Settings(BaseSettings):
    """Everything the receiver, the pipelines and the HTTP service are told."""

    model_config = SettingsConfigDict(
        env_prefix="VANNAH_", frozen=True, extra="forbid", validate_default=True
    )

    data_dir: Path = Field(default=Path("data"), description="root of every data folder")
    dicom_aet: str = Field(default="VANNAHCLOUD", min_length=1, max_length=16)
    dicom_port: int = Field(default=4242, ge=0, le=65535)
    remote_access_allowed: bool = Field(
        default=False, description="listen on all addresses instead of 127.0.0.1"
    )
    authentication_enabled: bool = False
    dicom_tls_enabled: bool = False
    routing_rules: list[dict[str, Any]] = Field(default_factory=list)

    receiver_workers: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2),
        ge=1,
        le=64,
        description="receiver processes sharing the DIMSE port",
    )
    max_associations: int = Field(default=16, ge=1, description="per receiver process")
    receiver_fast_store: bool = Field(
        default=True,
        description="serve storage/verification-only associations with the receiver's own "
        "DIMSE acceptor instead of pynetdicom",
    )
    landing_batch_max_files: int = Field(default=500, ge=1)
    landing_batch_max_age_seconds: float = Field(default=1.0, gt=0)
    ingest_run_max_files: int = Field(default=20_000, ge=1)
    ingest_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)
    dagster_port: int = Field(default=3000, ge=0, le=65535)
    dicomweb_port: int = Field(default=8042, ge=0, le=65535)
    dicomweb_cors_origins: tuple[str, ...] = Field(
        default=(),
        description="origins a browser may call the DICOMweb API from (none until configured; "
        "docs/viewers.md)",
    )
    dicomweb_allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Host header values the DICOMweb service answers (host names, no port); "
        "empty: localhost, 127.0.0.1 and ::1, plus any host when remote access is allowed",
    )
    dicomweb_max_limit: int = Field(default=1000, ge=1, description="QIDO-RS limit ceiling")
    dicomweb_max_offset: int = Field(
        default=1_000_000_000, ge=0, description="QIDO-RS offset above this: 400"
    )
    dicomweb_max_body_bytes: int = Field(
        default=1024**2, ge=1, description="request body limit of every route but STOW-RS"
    )
    dicomweb_max_decoded_bytes: int = Field(
        default=256 * 1024**2,
        ge=1,
        description="pixel budget of one rendered, thumbnail, frames or transcoding request: "
        "Rows x Columns x SamplesPerPixel x bytes per sample x frames decoded, checked from "
        "the header before any decode",
    )
    dicomweb_max_frames: int = Field(
        default=1000, ge=1, description="frame numbers in one WADO-RS frames request"
    )
    dicomweb_max_concurrency: int = Field(
        default=64, ge=1, description="connections the DICOMweb service serves at once (503 past)"
    )
    dicomweb_keep_alive_seconds: float = Field(default=5.0, gt=0)
    stow_max_bytes: int = Field(default=2 * 1024**3, ge=1, description="STOW-RS body limit")
    stow_max_parts: int = Field(
        default=10_000, ge=1, description="parts of one STOW-RS request (413 past)"
    )
    free_space_reserve_mb: int = Field(
        default=512,
        ge=0,
        description="free disk space kept in reserve: the receiver answers 0xA700 and STOW-RS "
        "507 rather than write into it",
    )
    max_instance_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        description="largest data set accepted over DIMSE, inflated size for deflated ones "
        "(0xA700 past)",
    )
    dimse_max_pdu_bytes: int = Field(
        default=262_144,
        ge=4096,
        le=2**32 - 1,
        description="Maximum Length Received the receiver advertises; a longer PDU is aborted",
    )
    dimse_min_bytes_per_second: int = Field(
        default=8192,
        ge=0,
        description="a peer in mid-PDU slower than this (over 10 s windows) is aborted (0: off)",
    )
    dimse_association_max_seconds: float = Field(
        default=3600.0, gt=0, description="an association lasting longer is aborted"
    )
    dimse_max_pending_connections: int = Field(
        default=32,
        ge=1,
        description="connections per receiver process that have not yet sent A-ASSOCIATE-RQ",
    )
    mllp_max_message_bytes: int = Field(default=1024**2, ge=1024)
    mllp_max_connections: int = Field(default=16, ge=1)
    mllp_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    ingest_max_attempts: int = Field(
        default=3,
        ge=1,
        description="failed ingest runs of a batch before it is split so one file cannot "
        "hold the others",
    )
    ingest_retry_base_seconds: float = Field(
        default=10.0, ge=0, description="backoff before re-requesting a failed batch (doubles)"
    )
    dicom_host: str | None = Field(
        default=None,
        description="the receiver's bind address (default: 127.0.0.1, or 0.0.0.0 with "
        "RemoteAccessAllowed)",
    )
    dicomweb_host: str | None = Field(default=None, description="DICOMweb bind address")
    mllp_host: str | None = Field(default=None, description="HL7 MLLP bind address")
    dagster_host: str = Field(
        default="127.0.0.1",
        description="Dagster webserver bind address (loopback whatever RemoteAccessAllowed says; "
        "the webserver has no authentication)",
    )
    worklist_past_due_hours: float = Field(
        default=24.0,
        ge=0,
        description="MWL C-FIND stops returning an open step this long after its scheduled "
        "start (0: never)",
    )
    worklist_mllp_port: int = Field(
        default=2575, ge=0, le=65535, description="HL7 v2 MLLP listener of `vannah worklist mllp`"
    )
    dicom_modalities: dict[str, RemoteModality] = Field(
        default_factory=dict,
        description="known peers (C-MOVE destinations), Orthanc's DicomModalities format",
    )
    qr_catalog_refresh_seconds: float = Field(
        default=0.5, ge=0, description="a Q/R request reloads the catalog at most this often"
    )

    @field_validator("dicom_modalities", mode="before")
    @classmethod
    def _orthanc_modalities(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(name): _modality(str(name), entry) for name, entry in value.items()}
        return value

    def modality_by_aet(self, aet: str) -> RemoteModality | None:
        """The known peer whose AE title is `aet` (trailing spaces ignored), or None."""
        wanted = aet.strip()
        for modality in self.dicom_modalities.values():
            if modality.aet.strip() == wanted:
                return modality
        return None

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> Settings:
        for name, message in NOT_YET_IMPLEMENTED.items():
            if getattr(self, name):
                raise ValueError(message)
        if self.routing_rules:
            raise ValueError("rules: routing is not implemented yet; remove the rules")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    @property
    def bind_host(self) -> str:
        """Default address of the DIMSE, DICOMweb and MLLP services."""
        return "0.0.0.0" if self.remote_access_allowed else "127.0.0.1"

    @property
    def dicom_bind_host(self) -> str:
        return self.dicom_host or self.bind_host

    @property
    def dicomweb_bind_host(self) -> str:
        return self.dicomweb_host or self.bind_host

    @property
    def mllp_bind_host(self) -> str:
        return self.mllp_host or self.bind_host

    @property
    def free_space_reserve_bytes(self) -> int:
        return self.free_space_reserve_mb * 1024**2

    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"

    @property
    def hot_dir(self) -> Path:
        return self.data_dir / "hot"

    @property
    def warm_dir(self) -> Path:
        return self.data_dir / "warm"

    @property
    def cold_dir(self) -> Path:
        return self.data_dir / "cold"

    @property
    def catalog_dir(self) -> Path:
        return self.data_dir / "catalog"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"


class _ConfigLocator(BaseSettings):
    """Finds the config file named by ``VANNAH_CONFIG``."""

    model_config = SettingsConfigDict(env_prefix="VANNAH_", extra="ignore")
    config: Path | None = None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from `config_file` (or ``$VANNAH_CONFIG``), env and `overrides`.

    Raises
    ------
    ConfigError
        With a readable message when any value is invalid or not implemented yet.
    """
    path = config_file if config_file is not None else _ConfigLocator().config
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    finally:
        _config_file.reset(token)
