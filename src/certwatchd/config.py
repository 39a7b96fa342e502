"""Settings: a TOML file, overridden by ``CERTWATCHD_<SECTION>__<KEY>``.

Unknown sections and keys are errors, so a typo never falls back to a
default silently. Every failure is a :class:`ConfigError` whose message
names the key, the value and what was expected.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from certwatchd.errors import ConfigError
from certwatchd.names import is_dns_name

DEFAULT_CONFIG = Path("/etc/certwatchd/config.toml")
ENV_PREFIX = "CERTWATCHD_"
ENV_CONFIG = "CERTWATCHD_CONFIG"


def _parse_mode(value: object) -> object:
    """Read a file mode: an integer (TOML ``0o640``) or an octal string."""
    if isinstance(value, bool):
        msg = f"expected an octal mode such as 0o640, got {value!r}"
        raise ValueError(msg)  # noqa: TRY004 - pydantic wants ValueError
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            msg = f"expected an octal mode such as 0o640, got {value!r}"
            raise ValueError(msg)
        return int(text, 8)
    return value


def _check_mode(value: int) -> int:
    if not 0 <= value <= 0o777:  # noqa: PLR2004 - the permission bits
        msg = (
            f"expected permission bits from 0o000 to 0o777, got {value}"
            f" (= {value:#o}); write octal modes as 0o640"
        )
        raise ValueError(msg)
    return value


Mode = Annotated[int, BeforeValidator(_parse_mode)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sources(_Section):
    """Where candidate pairs come from."""

    letsencrypt_live: Path = Path("/etc/letsencrypt/live")
    prosody_certs: Path = Path("/etc/prosody/certs")


class Install(_Section):
    """Where and how pairs are installed for Prosody."""

    certs_dir: Path = Path("/etc/prosody/certs")
    layout: Literal["flat", "directory"] = "flat"
    owner: str = "root"
    group: str = "prosody"
    cert_mode: Mode = 0o644
    key_mode: Mode = 0o640
    hosts: tuple[str, ...] = ()

    @field_validator("cert_mode", "key_mode")
    @classmethod
    def _mode_bits(cls, value: int) -> int:
        return _check_mode(value)

    @field_validator("key_mode")
    @classmethod
    def _key_private(cls, value: int) -> int:
        if value & 0o007:
            msg = (
                f"{value:#o} lets every user read or change the private"
                " key; expected no permission bits for others, e.g. 0o640"
            )
            raise ValueError(msg)
        return value

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not is_dns_name(host):
                msg = (
                    f"{host!r} is not a lower-case DNS name such as"
                    " 'example.com'"
                )
                raise ValueError(msg)
        return value


class Validation(_Section):
    """How far a chain must verify."""

    trust: str = "system"

    @field_validator("trust")
    @classmethod
    def _trust_source(cls, value: str) -> str:
        if value in {"system", "none"}:
            return value
        if not Path(value).is_file():
            msg = (
                f"expected 'system', 'none' or the path of a PEM file of"
                f" trusted roots; {value!r} is not a file"
            )
            raise ValueError(msg)
        return value


class Reload(_Section):
    """The command that makes Prosody pick up new files."""

    command: tuple[str, ...] = ("prosodyctl", "reload")
    timeout_seconds: float = Field(default=30.0, gt=0)
    debounce_seconds: float = Field(default=2.0, ge=0)
    max_delay_seconds: float = Field(default=30.0, gt=0)
    retry_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)

    @field_validator("command")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not value[0]:
            msg = "expected an argv list such as ['prosodyctl', 'reload']"
            raise ValueError(msg)
        return value


class Expiry(_Section):
    """When an installed certificate is close enough to expiry to say so."""

    warn_days: int = Field(default=30, ge=0)
    critical_days: int = Field(default=7, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Expiry:
        if self.critical_days > self.warn_days:
            msg = (
                f"critical_days ({self.critical_days}) must not exceed"
                f" warn_days ({self.warn_days})"
            )
            raise ValueError(msg)
        return self


class State(_Section):
    """Where certwatchd keeps its own records and backups."""

    dir: Path = Path("/var/lib/certwatchd")


class Log(_Section):
    """How events are written."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "journal", "json", "console"] = "auto"


class Daemon(_Section):
    """The long-running watcher."""

    reconcile_interval_seconds: float = Field(default=300.0, gt=0)
    quarantine_after_seconds: float = Field(default=10.0, ge=0)


class Endpoint(_Section):
    """One place Prosody serves a host's certificate, to check after reload."""

    host: str
    address: str = "127.0.0.1"
    port: int = Field(default=5222, ge=1, le=65535)
    mode: Literal["xmpp-client", "xmpp-server", "tls"] = "xmpp-client"

    @field_validator("host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not is_dns_name(value):
            msg = f"{value!r} is not a lower-case DNS name"
            raise ValueError(msg)
        return value

    @field_validator("address")
    @classmethod
    def _ip_literal(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            msg = (
                f"{value!r} is not an IP address; verification connects"
                " only to addresses given literally, such as 127.0.0.1"
            )
            raise ValueError(msg) from None
        return value


class Verify(_Section):
    """Checking that Prosody serves what was installed."""

    endpoints: tuple[Endpoint, ...] = ()
    timeout_seconds: float = Field(default=10.0, gt=0)


class Settings(BaseSettings):
    """Every setting, from defaults, the TOML file and the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    sources: Sources = Sources()
    install: Install = Install()
    validation: Validation = Validation()
    reload: Reload = Reload()
    expiry: Expiry = Expiry()
    state: State = State()
    log: Log = Log()
    daemon: Daemon = Daemon()
    verify: Verify = Verify()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Let the environment win over the file's values."""
        del settings_cls, dotenv_settings, file_secret_settings
        return (env_settings, init_settings)


@dataclass(frozen=True)
class Ownership:
    """Numeric owner and group of installed files, resolved once."""

    uid: int
    gid: int


def config_path(argument: Path | None) -> tuple[Path, bool]:
    """Say which file to read and whether it must exist."""
    if argument is not None:
        return argument, True
    named = os.environ.get(ENV_CONFIG)
    if named:
        return Path(named), True
    return DEFAULT_CONFIG, False


def load_settings(argument: Path | None = None) -> Settings:
    """Load settings from the chosen file and the environment.

    A missing default file means built-in defaults; a missing file named
    on the command line or in ``CERTWATCHD_CONFIG`` is an error.
    """
    path, required = config_path(argument)
    table = _read_toml(path, required=required)
    _check_environment()

    try:
        return Settings(**table)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def resolve_ownership(settings: Settings) -> Ownership:
    """Look up ``install.owner`` and ``install.group`` in the system."""
    owner = settings.install.owner
    group = settings.install.group
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        msg = f"user {owner!r} does not exist (install.owner)"
        raise ConfigError(msg) from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        msg = f"group {group!r} does not exist (install.group)"
        raise ConfigError(msg) from None
    return Ownership(uid=uid, gid=gid)


def _check_environment() -> None:
    """Refuse ``CERTWATCHD_`` variables that name no section.

    pydantic-settings only looks up the variables of known sections, so a
    misspelt section would otherwise be ignored without a word.
    """
    sections = set(Settings.model_fields)
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).partition("__")
        if section.lower() not in sections or not key:
            msg = (
                f"environment variable {name}: unknown section"
                f" {section.lower()!r}; expected CERTWATCHD_<SECTION>__<KEY>"
                f" with a section among {', '.join(sorted(sections))}"
            )
            raise ConfigError(msg)


def _read_toml(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        if required:
            msg = f"config file {path} does not exist"
            raise ConfigError(msg) from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"config file {path} cannot be read: {exc.strerror}"
        raise ConfigError(msg) from None


def _describe(exc: ValidationError, path: Path) -> str:
    """Turn pydantic's first complaint into one line for an operator."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    env_name = (
        ENV_PREFIX + "__".join(str(part) for part in error["loc"]).upper()
    )
    origin = (
        f"environment variable {env_name}"
        if env_name in os.environ
        else str(path)
    )

    if error["type"] == "extra_forbidden":
        kind = "section" if len(error["loc"]) == 1 else "key"
        return f"{origin}: unknown {kind} {key!r}"
    reason = error["msg"].removeprefix("Value error, ")
    value = error["input"]
    shown = (
        f"{value:#o}"
        if key.endswith("_mode") and type(value) is int
        else repr(value)
    )
    return f"{origin}: {key} = {shown}: {reason}"
