"""``S3Credentials``: the seed API's connection value for an S3 (or S3-compatible) store."""

from __future__ import annotations

from typing import Any

import attrs

from tracker_core import arguments

__all__ = ["S3Credentials"]


@attrs.frozen
class S3Credentials:
    """Where the S3 store is and how to sign in to it.

    ``endpoint`` is a host (``"s3.amazonaws.com"``, ``"minio:9000"``) or a full URL; a bare
    host gets ``https://`` when ``secure`` else ``http://``. The secret key never appears in
    ``repr``/``str`` (and so in no log line or error message built from this value).
    """

    endpoint: str = attrs.field(validator=arguments.validator(arguments.text))
    access_key: str = attrs.field(validator=arguments.validator(arguments.secret_text))
    secret_key: str = attrs.field(repr=False, validator=arguments.validator(arguments.secret_text))
    bucket_name: str = attrs.field(validator=arguments.validator(arguments.text))
    secure: bool = attrs.field(default=True, validator=arguments.validator(arguments.flag))

    @property
    def endpoint_url(self) -> str:
        """The endpoint as a URL: ``https://s3.amazonaws.com`` for ``"s3.amazonaws.com"``."""
        if "://" in self.endpoint:
            return self.endpoint.rstrip("/")
        return f"{'https' if self.secure else 'http'}://{self.endpoint.strip('/')}"

    def storage_options(self) -> dict[str, Any]:
        """s3fs ``storage_options`` for these credentials."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
        }
