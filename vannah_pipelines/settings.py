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
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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
    "RegisteredUsers": "registered_users",
    "SslEnabled": "ssl_enabled",
    "SslCertificate": "ssl_certificate",
    "DicomTlsCertificate": "dicom_tls_certificate",
    "DicomTlsPrivateKey": "dicom_tls_private_key",
    "DicomTlsTrustedCertificates": "dicom_tls_trusted_certificates",
    "DicomTlsRemoteCertificateRequired": "dicom_tls_remote_certificate_required",
    "DicomCheckCalledAet": "dicom_check_called_aet",
    "DicomCheckModalityHost": "dicom_check_modality_host",
    "DicomAlwaysAllowStore": "dicom_always_allow_store",
    "DicomAlwaysAllowEcho": "dicom_always_allow_echo",
}


# Secrets read from VANNAH_* environment variables only, never from the config file.
ENV_ONLY = (
    "catalog_lake_s3_secret",
    "warm_s3_secret_key",
    "cold_s3_secret_key",
    "routing_secrets",
)

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
    for name in ENV_ONLY:
        if name in values:
            raise ConfigError(
                f"config file {path} sets {name!r}: a secret, taken from the environment only "
                f"(VANNAH_{name.upper()})"
            )
    return values


class RemoteModality(BaseModel):
    """A known DICOM peer (a C-MOVE destination): AE title, host and port; with
    ``use_dicom_tls`` (Orthanc's ``UseDicomTls``) associations to it are made over TLS."""

    model_config = ConfigDict(frozen=True)

    aet: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    use_dicom_tls: bool = False


class ApiKey(BaseModel):
    """A static API key for a service (``X-API-Key: <key>`` or ``Authorization: Bearer <key>``)."""

    model_config = ConfigDict(frozen=True)

    key: SecretStr = Field(min_length=16)
    roles: tuple[str, ...] = ("read",)


def _modality(name: str, value: Any) -> Any:
    """Orthanc's ``DicomModalities`` entry: ``["AET", "host", port(, manufacturer)]`` or
    ``{"AET": ..., "Host": ..., "Port": ...}`` (other Orthanc keys are ignored)."""
    if isinstance(value, list | tuple):
        if len(value) < 3:
            raise ValueError(f"DicomModalities.{name}: expected [AET, host, port]")
        return {"aet": value[0], "host": value[1], "port": value[2]}
    if isinstance(value, dict):
        lower = {str(k).lower(): v for k, v in value.items()}
        entry = {"aet": lower.get("aet"), "host": lower.get("host"), "port": lower.get("port")}
        if "usedicomtls" in lower:
            entry["use_dicom_tls"] = lower["usedicomtls"]
        return entry
    return value


class TierDays(BaseModel):
    """Per-modality lifecycle ages (``tier_modality_days``): days hot, days until cold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hot_days: int = Field(ge=0)
    warm_days: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> TierDays:
        if self.warm_days < self.hot_days:
            raise ValueError("warm_days (days until cold) must be at least hot_days")
        return self


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
    authentication_enabled: bool = Field(
        default=False,
        description="every DICOMweb, worklist and viewer route requires credentials; DIMSE "
        "associations need a known peer or user identity (docs/security.md)",
    )
    registered_users: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="HTTP Basic and DIMSE user identity: user name -> password (Orthanc's "
        "RegisteredUsers)",
    )
    user_roles: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="roles of each registered user (read, write, admin); a user not listed "
        "has every role, as in Orthanc",
    )
    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict, description='service name -> {"key": ..., "roles": [...]}'
    )
    jwt_hs256_secret: SecretStr | None = Field(
        default=None, description="shared secret of HS256 bearer tokens"
    )
    jwt_public_key_file: Path | None = Field(
        default=None, description="PEM public key of RS256/ES256 bearer tokens"
    )
    jwt_jwks_url: str | None = Field(
        default=None,
        description="JWKS URL of an OIDC provider (Keycloak: .../protocol/openid-connect/certs)",
    )
    jwt_issuer: str | None = Field(default=None, description="required `iss` of bearer tokens")
    jwt_audience: str | None = Field(default=None, description="required `aud` of bearer tokens")
    jwt_roles_claim: str = Field(
        default="roles",
        description="claim holding the roles, dotted for nested claims (Keycloak: "
        "realm_access.roles)",
    )
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, description="clock skew allowed")
    token_signing_key_file: Path | None = Field(
        default=None,
        description="secret signing the platform's own study-scoped tokens (default "
        "<data>/secrets/token-signing.key, created on first use)",
    )
    launch_token_ttl_seconds: float = Field(
        default=900.0, gt=0, le=7 * 86400, description="lifetime of a minted launch token"
    )
    viewer_enabled: bool = Field(default=True, description="serve the built-in OHIF at /viewer")
    viewer_launch_url: str = Field(
        default="/viewer?studyUID={studyUID}&token={token}",
        description="where /viewer/launch and `vannah token` send the user; placeholders "
        "{studyUID}, {patientID}, {token}, {base} (docs/viewers.md)",
    )
    viewer_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "vannah" / "ohif",
        description="where `vannah viewer fetch` keeps OHIF's prebuilt files, one folder per "
        "version (<dir>/3.13.2/dist)",
    )
    viewer_npm_registry: str = Field(
        default="https://registry.npmjs.org",
        description="npm registry (or a mirror of it) `vannah viewer fetch` downloads the "
        "pinned @ohif/app tarball from; its integrity is checked whatever the registry",
    )
    public_base_url: str | None = Field(
        default=None,
        description="the URL users reach the DICOMweb service at (default: from the bind "
        "address, port and SslEnabled)",
    )
    ssl_enabled: bool = Field(default=False, description="HTTPS on the DICOMweb service")
    ssl_certificate: Path | None = Field(
        default=None, description="one PEM file: certificate (chain) and private key"
    )
    dicom_tls_enabled: bool = Field(default=False, description="TLS on the DIMSE receiver")
    dicom_tls_certificate: Path | None = Field(
        default=None, description="PEM certificate (chain) of the receiver"
    )
    dicom_tls_private_key: Path | None = Field(default=None, description="PEM private key")
    dicom_tls_trusted_certificates: Path | None = Field(
        default=None, description="PEM bundle of the CAs/peers trusted for DICOM TLS"
    )
    dicom_tls_remote_certificate_required: bool = Field(
        default=True, description="peers must present a certificate signed by a trusted one"
    )
    dicom_check_called_aet: bool = Field(
        default=False, description="reject associations whose called AE title is not ours"
    )
    dicom_check_modality_host: bool = Field(
        default=False, description="a known peer's AE title must come from its configured host"
    )
    dicom_always_allow_store: bool = Field(
        default=True,
        description="unknown or unauthenticated peers may still store (Orthanc's default)",
    )
    dicom_always_allow_echo: bool = Field(
        default=True, description="unknown or unauthenticated peers may still C-ECHO"
    )
    routing_rules: list[dict[str, Any]] = Field(
        default_factory=list,
        description="inline routing rules (file key `rules`, the product documentation's "
        "format; docs/routing.md); validated at startup, not reloaded",
    )
    routing_rules_file: Path | None = Field(
        default=None,
        description='a rules file ({"rules": [...]}) re-read when it changes; a bad file '
        "keeps the last good rules (docs/routing.md)",
    )
    routing_rules_max_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="the largest routing rules file read; a larger one is refused from its "
        "size, unread, and the last good rules stay in force",
    )
    routing_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="secrets routing destinations name (STOW-RS token or API key, S3 "
        '"ACCESS_KEY:SECRET_KEY"): name -> value, JSON (environment only)',
    )
    routing_max_attempts: int = Field(
        default=8,
        ge=1,
        le=100,
        description="attempts of one delivery before it is dead-lettered (retried by hand: "
        "`vannah route --retry` or the retry_deliveries_job)",
    )
    routing_retry_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="wait after a delivery's first failure; doubled after each further one",
    )
    routing_retry_max_seconds: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="the longest wait between attempts"
    )
    routing_rescan_seconds: int = Field(
        default=120,
        ge=0,
        le=86400,
        description="how far back each routing sensor tick looks again for indexed "
        "instances (a batch indexed late is still routed; none is routed twice)",
    )
    routing_run_linger_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="a routing run keeps taking new deliveries until none was due for this "
        "long (each batch need not wait for a new run to start)",
    )
    routing_run_max_seconds: float = Field(
        default=900.0, gt=0, le=86400, description="the longest a routing run goes on"
    )
    routing_backlog_alert_seconds: int = Field(
        default=900,
        ge=1,
        description="the routing_backlog_fresh check fails when a due delivery has waited "
        "longer than this",
    )

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
    landed_overlay_max_instances: int = Field(
        default=20_000,
        ge=0,
        description="landed, not yet indexed instances a reading process holds in memory so "
        "they answer queries before ingest",
    )
    landed_overlay_max_file_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description="larger landed files answer once ingested, not before (each reading "
        "process would read them whole)",
    )
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
    catalog_memory_limit_mb: int = Field(
        default=256,
        ge=32,
        description="DuckDB buffer pool of each process that reads the catalog (DICOMweb, "
        "each receiver worker serving Q/R): what stays in memory whatever the archive's size",
    )
    catalog_compaction_memory_limit_mb: int = Field(
        default=1024, ge=64, description="DuckDB memory of a compaction run (it spills beyond)"
    )
    catalog_compaction_cron: str = Field(
        default="30 2 * * *", description="when the daily compaction runs (cron, UTC)"
    )
    catalog_compaction_max_pending_files: int = Field(
        default=2000,
        ge=1,
        description="compact before the daily run once this many batch files wait",
    )
    catalog_compaction_grace_seconds: float = Field(
        default=600.0,
        ge=0,
        description="files a compaction replaced are deleted by a later one, once the new "
        "generation is this old (readers of the previous one finish first)",
    )

    catalog_lake_postgres: SecretStr | None = Field(
        default=None,
        description="libpq connection string of the DuckLake's PostgreSQL metadata database "
        "(unset: the embedded catalog of local files, no server)",
    )
    catalog_lake_data_path: str | None = Field(
        default=None, description="s3://bucket/prefix/ of the DuckLake's Parquet files"
    )
    catalog_lake_s3_endpoint: str = Field(
        default="", description="host:port of an S3-compatible server (empty: AWS S3)"
    )
    catalog_lake_s3_key_id: str = Field(default="", description="S3 access key id of the lake")
    catalog_lake_s3_secret: SecretStr = Field(
        default=SecretStr(""), description="S3 secret key of the lake (environment only)"
    )
    catalog_lake_s3_region: str = Field(default="us-east-1", description="S3 region of the lake")
    catalog_lake_s3_use_ssl: bool = Field(default=True, description="HTTPS to the S3 endpoint")

    # ---------------------------------------------------------------- storage tiers
    warm_storage: Literal["local", "s3"] = Field(
        default="local",
        description="warm tier backend: a local folder (data/warm) or S3-compatible object "
        "storage (MinIO) through the minio SDK",
    )
    warm_s3_endpoint: str = Field(default="", description="host:port of the warm S3 server")
    warm_s3_bucket: str = Field(default="vannah-warm", description="bucket of the warm tier")
    warm_s3_prefix: str = Field(default="", description="key prefix inside the warm bucket")
    warm_s3_access_key: str = Field(default="", description="access key of the warm tier")
    warm_s3_secret_key: SecretStr = Field(
        default=SecretStr(""), description="secret key of the warm tier (environment only)"
    )
    warm_s3_region: str = Field(default="", description="region of the warm bucket (optional)")
    warm_s3_secure: bool = Field(default=True, description="HTTPS to the warm S3 server")
    cold_storage: Literal["local", "s3-archive"] = Field(
        default="local",
        description="cold tier backend: a local folder (data/cold) or S3 with an archive "
        "storage class through boto3",
    )
    cold_s3_endpoint_url: str = Field(
        default="", description="URL of the cold S3 endpoint (empty: AWS S3 of the region)"
    )
    cold_s3_bucket: str = Field(default="vannah-cold", description="bucket of the cold tier")
    cold_s3_prefix: str = Field(default="", description="key prefix inside the cold bucket")
    cold_s3_access_key: str = Field(
        default="", description="access key of the cold tier (empty: boto3's own chain)"
    )
    cold_s3_secret_key: SecretStr = Field(
        default=SecretStr(""), description="secret key of the cold tier (environment only)"
    )
    cold_s3_region: str = Field(default="us-east-1", description="region of the cold bucket")
    cold_storage_class: Literal["GLACIER", "DEEP_ARCHIVE"] = Field(
        default="DEEP_ARCHIVE", description="S3 storage class of cold objects"
    )
    cold_restore_tier: Literal["Expedited", "Standard", "Bulk"] = Field(
        default="Standard", description="S3 restore speed asked for cold objects"
    )
    cold_restore_expected_hours: float = Field(
        default=12.0,
        gt=0,
        description="how long a cold restore is expected to take (shown in the catalog, "
        "sent as Retry-After)",
    )
    restore_cache_days: int = Field(
        default=7,
        ge=1,
        description="days a study restored from the cold tier stays hot before it is re-tiered",
    )
    storage_timeout_seconds: float = Field(
        default=30.0, gt=0, description="connect/read timeout of object storage calls"
    )
    storage_spool_memory_mb: int = Field(
        default=8,
        ge=1,
        description="an object read from object storage is spooled in memory up to this "
        "size, then to a temporary file",
    )
    tier_hot_days: int = Field(default=30, ge=0, description="days a study stays hot")
    tier_warm_days: int = Field(
        default=365, ge=0, description="days until a study moves to the cold tier"
    )
    tier_age_from: Literal["last_received", "study_date"] = Field(
        default="last_received",
        description="a study's age counts from its last received instance, or from its "
        "StudyDate (an empty or bad date falls back to the last received instance)",
    )
    tier_modality_days: dict[str, TierDays] = Field(
        default_factory=dict,
        description='per-modality ages, e.g. {"MG": {"hot_days": 90, "warm_days": 3650}}; '
        "a study with several modalities takes the longest",
    )
    tier_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description="after a study's new location is recorded, readers holding the old "
        "one get this long before its source objects are deleted",
    )
    tier_cron: str = Field(default="0 2 * * *", description="when the daily tiering runs")
    tier_max_studies_per_run: int = Field(
        default=2000, ge=1, description="studies one tiering run moves at most"
    )
    prefetch_priors: bool = Field(
        default=True,
        description="restore a scheduled patient's prior studies from the cold tier",
    )
    prefetch_lookback_days: int = Field(
        default=1825, ge=0, description="priors as old as this are restored (0: any age)"
    )
    prefetch_max_studies: int = Field(
        default=5, ge=0, description="most recent prior studies restored per scheduled step"
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
        if self.authentication_enabled and not (
            self.registered_users
            or self.api_keys
            or self.jwt_hs256_secret
            or self.jwt_public_key_file
            or self.jwt_jwks_url
        ):
            raise ValueError(
                "AuthenticationEnabled: no credential is configured; set RegisteredUsers, "
                "api_keys or a JWT verification key (jwt_hs256_secret, jwt_public_key_file, "
                "jwt_jwks_url)"
            )
        if self.ssl_enabled and self.ssl_certificate is None:
            raise ValueError("SslEnabled: SslCertificate must name a PEM file")
        if self.dicom_tls_enabled and (
            self.dicom_tls_certificate is None or self.dicom_tls_private_key is None
        ):
            raise ValueError(
                "DicomTlsEnabled: DicomTlsCertificate and DicomTlsPrivateKey must name PEM files"
            )
        if (
            self.dicom_tls_enabled
            and self.dicom_tls_remote_certificate_required
            and self.dicom_tls_trusted_certificates is None
        ):
            raise ValueError(
                "DicomTlsRemoteCertificateRequired: DicomTlsTrustedCertificates must name "
                "the PEM bundle peers' certificates are checked against (or set "
                "DicomTlsRemoteCertificateRequired to false)"
            )
        for name in (
            "ssl_certificate",
            "dicom_tls_certificate",
            "dicom_tls_private_key",
            "dicom_tls_trusted_certificates",
            "jwt_public_key_file",
        ):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if (self.catalog_lake_postgres is None) != (self.catalog_lake_data_path is None):
            raise ValueError(
                "catalog_lake_postgres and catalog_lake_data_path: set both (the DuckLake "
                "catalog) or neither (the embedded catalog)"
            )
        if self.routing_rules and self.routing_rules_file is not None:
            raise ValueError(
                "rules and routing_rules_file: give the rules inline or in a file, not both"
            )
        if self.routing_rules:
            from vannah_pipelines.routing.rules import RulesError, parse_rules

            try:
                parse_rules(self.routing_rules, secret_names=self.routing_secrets, source="rules")
            except RulesError as exc:
                raise ValueError(str(exc)) from None
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
    def restore_requests_dir(self) -> Path:
        """The restore spool: one file per study a read found in the cold tier."""
        return self.data_dir / "restore-requests"

    @property
    def catalog_dir(self) -> Path:
        return self.data_dir / "catalog"

    @property
    def routing_dir(self) -> Path:
        """Routing state: the last good rules (``last-good-rules.json``)."""
        return self.data_dir / "routing"

    def routing_secret(self, name: str) -> SecretStr:
        """The routing secret `name` (``VANNAH_ROUTING_SECRETS``).

        Raises
        ------
        ConfigError
            No secret of that name is configured.
        """
        try:
            return self.routing_secrets[name]
        except KeyError:
            raise ConfigError(
                f"routing secret {name!r} is not set (VANNAH_ROUTING_SECRETS)"
            ) from None

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def audit_dir(self) -> Path:
        return self.catalog_dir / "audit"

    @property
    def token_signing_key_path(self) -> Path:
        return self.token_signing_key_file or self.data_dir / "secrets" / "token-signing.key"

    @property
    def base_url(self) -> str:
        """The DICOMweb service's origin as users reach it (no trailing slash)."""
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        scheme = "https" if self.ssl_enabled else "http"
        host = self.dicomweb_bind_host
        if host in {"0.0.0.0", "::", ""}:
            host = "localhost"
        return f"{scheme}://{host}:{self.dicomweb_port}"


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
