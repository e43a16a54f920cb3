"""Errors in OpenAI's body and status, and how the network's failures map onto them."""

from __future__ import annotations

from starlette.responses import JSONResponse

from node.admission import REQUEST_FAULTS, Reason
from node.p2p.failover import NoWorkerError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          403: "permission_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error",
          503: "service_unavailable"}
# OpenAI's codes for the refusals of the request itself (node.admission.REQUEST_FAULTS).
_FAULT_CODES = {Reason.TOO_LONG: "context_length_exceeded", Reason.BAD_SAMPLING: "invalid_sampling",
                Reason.MALFORMED: "invalid_request"}
# Refusals that say "busy or too dear now": the client may retry later.
_BUSY = {Reason.RATE_LIMITED, Reason.TOO_MANY_CONCURRENT, Reason.QUEUE_FULL, Reason.PRICE_TOO_LOW,
         Reason.SHUTTING_DOWN}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def network_error(exc: NoWorkerError, model: str, prompt_param: str) -> ApiError:
    """What a failed run_with_failover means to an OpenAI client. `prompt_param` is where the request
    holds its prompt ("messages", "prompt"), which OpenAI names when the context is exceeded."""
    refusals = [a for a in exc.attempts if a.outcome == "refused"]
    for attempt in refusals:
        if attempt.reason in REQUEST_FAULTS:
            reason = Reason(attempt.reason)
            return ApiError(400, f"refused by worker {attempt.peer_id}: {attempt.detail}",
                            param=prompt_param if reason is Reason.TOO_LONG else None, code=_FAULT_CODES[reason])
    if not exc.attempts:
        return ApiError(429, f"no worker serves {model!r} within the gateway's price caps now: {exc}",
                        code="no_capacity")
    if refusals and all(a.reason in _BUSY for a in refusals) and len(refusals) == len(exc.attempts):
        return ApiError(429, f"every worker for {model!r} is busy: {exc}", code="no_capacity")
    return ApiError(503, str(exc), code="no_workers")
