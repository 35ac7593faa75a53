"""``GCSCredentials``: where a GCS bucket is and how to sign in to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from tracker_core import arguments
from tracker_core.errors import ConfigurationError

__all__ = ["GCSCredentials"]


def _info(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        arguments.refuse(
            "service_account_info", value, "None or the parsed key file (a dict)", secret=True
        )
    return dict(value) if value is not None else None


@attrs.frozen
class GCSCredentials:
    """A bucket and the credentials to use it.

    - ``service_account_file``: path of a service-account JSON key file, or
    - ``service_account_info``: the parsed content of one (never shown in ``repr``/``str``);
    - neither: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud,
      metadata server), or anonymous access when an emulator is used;
    - ``project``: the billing project (gcsfs needs one to create or list buckets);
    - ``endpoint_url``: a GCS-compatible endpoint such as an emulator
      (``http://127.0.0.1:9023``); default ``$STORAGE_EMULATOR_HOST``, else Google's.
    """

    bucket_name: str = attrs.field(validator=arguments.validator(arguments.text))
    project: str | None = attrs.field(
        default=None, validator=arguments.validator(arguments.optional_text)
    )
    service_account_file: str | None = attrs.field(
        default=None, validator=arguments.validator(arguments.optional_text)
    )
    service_account_info: dict[str, Any] | None = attrs.field(
        default=None, converter=_info, repr=False, eq=False, hash=False
    )
    endpoint_url: str | None = attrs.field(
        default=None, validator=arguments.validator(arguments.optional_text)
    )

    def __attrs_post_init__(self) -> None:
        if self.service_account_file and self.service_account_info:
            raise ConfigurationError("give service_account_file or service_account_info, not both")

    def storage_options(self) -> dict[str, Any]:
        """gcsfs ``storage_options`` for these credentials."""
        options: dict[str, Any] = {}
        if self.project:
            options["project"] = self.project
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url.rstrip("/")
        if self.service_account_file:
            options["token"] = self.service_account_file
        elif self.service_account_info:
            options["token"] = dict(self.service_account_info)
        elif self.endpoint_url:
            options["token"] = "anon"  # an emulator takes no credentials
        return options

    def secrets(self) -> tuple[str, ...]:
        """Secret values held here, for scrubbing from messages."""
        info = self.service_account_info or {}
        return tuple(str(info[k]) for k in ("private_key", "private_key_id") if info.get(k))
