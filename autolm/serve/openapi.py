"""/openapi.json generated from the pydantic request and response models: each route's request body, its
answers (JSON, and server-sent events where it streams) and OpenAI's error body for the errors it can give.
The handlers read their bodies themselves (size limit, timeout, parsing off the event loop), so FastAPI
cannot see these models; they are added here in one pass, which keeps same-named models apart."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .responses import ErrorResponse

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "invalid request: the message names every bad field",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "408": "the body was not sent in time",
    "413": "body over the size limit",
    "500": "generation failed",
    "503": "the server is shutting down",
}


@dataclass
class Route:
    path: str
    method: str
    requests: tuple[type[BaseModel], ...]
    response: type[BaseModel]
    chunk: type[BaseModel] | None = None  # what each server-sent event's data holds, when the route streams
    errors: tuple[str, ...] = ("400", "401", "404", "408", "413", "500", "503")


def openapi_schema(app, routes: list[Route], version: str, secured: bool) -> dict:
    """The OpenAPI document for the app's routes (cached on the app, as FastAPI does)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title="autolm", version=version, routes=app.routes)
    pairs = [(m, "validation") for r in routes for m in r.requests]
    pairs += [(r.response, "serialization") for r in routes] + [(ErrorResponse, "serialization")]
    pairs += [(r.chunk, "serialization") for r in routes if r.chunk is not None]
    refs, defs = models_json_schema(list(dict.fromkeys(pairs)), ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for r in routes:
        op = doc["paths"][r.path][r.method]
        if r.requests:
            body = [refs[(m, "validation")] for m in r.requests]
            schema = body[0] if len(body) == 1 else {"anyOf": body}
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        ok = {"application/json": {"schema": refs[(r.response, "serialization")]}}
        if r.chunk is not None:  # OpenAPI 3.2's itemSchema, as an extension of 3.1
            ok["text/event-stream"] = {
                "schema": {"type": "string", "description": "`data: <chunk>` events, then `data: [DONE]`"},
                "x-itemSchema": refs[(r.chunk, "serialization")],
            }
        error = {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}
        op["responses"] = {"200": {"description": "OK", "content": ok}}
        op["responses"].update({code: {"description": ERRORS[code], "content": error} for code in r.errors})
        if secured and r.errors and "401" in r.errors:
            op["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc
