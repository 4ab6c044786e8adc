"""Errors the gateway answers with, all in OpenAI's envelope.

    GatewayError                 status  type                    when
    ├── BadRequest               400     invalid_request_error   malformed JSON, wrong types
    ├── Unauthorized             401     authentication_error    missing or wrong API key
    ├── Forbidden                403     permission_error        task or class not allowed
    ├── TaskNotFound             404     invalid_request_error   unknown task (model) name
    ├── PayloadTooLarge          413     invalid_request_error   body over the size limit
    ├── RateLimited              429     rate_limit_error        queue or rate limit full
    ├── BadGateway               502     upstream_error          upstream sent garbage
    ├── ServiceUnavailable       503     service_unavailable     no usable upstream, shed
    └── DeadlineExceeded         504     timeout_error           deadline passed

Every 503 carries ``Retry-After`` (its own, else :data:`RETRY_AFTER_503_S`), so clients that
honour it (OpenAI's SDKs do) come back after a pause rather than at once.

Once a stream has started the status line is gone, so the same envelope is sent in band as
an SSE ``data:`` event followed by ``data: [DONE]`` (see :mod:`gateway.sse`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

#: ``Retry-After`` of a 503 that names none: an upstream that went away is seen back by the
#: health checks (every 2 s by default), a restarted vLLM takes about a minute on CPU.
RETRY_AFTER_503_S = 5


class GatewayError(Exception):
    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return json.dumps(self.envelope(), ensure_ascii=False).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class TaskNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after_s: int) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class BadGateway(GatewayError):
    status = 502
    type = "upstream_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, headers=headers)
        if not any(name.lower() == "retry-after" for name in self.headers):
            self.headers["Retry-After"] = str(RETRY_AFTER_503_S)


class DeadlineExceeded(GatewayError):
    status = 504
    type = "timeout_error"

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message, code="deadline_exceeded")
        self.stage = stage
