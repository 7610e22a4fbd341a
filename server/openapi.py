"""OpenAPI for endpoints that take either JSON or multipart: both bodies are documented."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .bodies import NUMBER

REF = "#/components/schemas/{model}"
BOX_FIELD = {"type": "string", "pattern": rf"^{NUMBER}(,{NUMBER}){{3}}$", "description": "x0,y0,x1,y1 in pixels"}
POINT_FIELD = {"type": "string", "pattern": rf"^{NUMBER},{NUMBER}$", "description": "x,y in pixels"}
TEXTS_FIELD = {"type": "array", "items": {"type": "string"}, "description": "Repeat the field for many"}
FORM_FIELDS: dict[str, dict[str, Any]] = {
    "image": {"type": "string", "format": "binary", "description": "The image file"},
    "box": BOX_FIELD,
    "point": POINT_FIELD,
    "boxes": {"type": "array", "items": BOX_FIELD, "description": "Repeat the field for many"},
    "points": {"type": "array", "items": POINT_FIELD, "description": "Repeat the field for many"},
    "text": TEXTS_FIELD,
    "texts": TEXTS_FIELD,
}


def form_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The multipart form of a JSON request model: a file for `image`, 'x0,y0,x1,y1' strings for boxes."""
    schema = model.model_json_schema(ref_template=REF)
    properties = {name: FORM_FIELDS.get(name, prop) for name, prop in schema["properties"].items()}
    return {
        "type": "object",
        "properties": properties,
        "required": schema.get("required", []),
        "additionalProperties": False,
    }


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its own body: JSON (`model`, base64 image) or multipart."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form_schema(model)},
                "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}},
            },
        }
    }


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key as `Authorization: Bearer <key>`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"},
}


def install_openapi(app: FastAPI, models: list[type[BaseModel]], open_paths: frozenset[str] | None = None) -> None:
    """Serve an OpenAPI schema that also holds `models` (the JSON request bodies) in its components. With API keys
    on, `open_paths` are the paths that need none: every other operation takes a key in either header (what
    Swagger UI's Authorize button sends)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs.get("$defs", {}))
            if open_paths is not None:
                components["securitySchemes"] = SECURITY_SCHEMES
                for path, operations in schema["paths"].items():
                    for operation in operations.values() if path not in open_paths else ():
                        operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
