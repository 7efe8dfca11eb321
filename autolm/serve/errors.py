"""The server's error: answered with OpenAI's error body, its status and the request field it names."""

from __future__ import annotations


class APIError(Exception):
    """An error answered with OpenAI's error body (responses.ErrorResponse): message, type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
