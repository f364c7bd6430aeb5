"""docs/openapi.yaml is a valid OpenAPI document and describes exactly the served routes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from openapi_spec_validator import validate

from popek.api.server import routes

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"


def _document() -> dict:
    return yaml.safe_load(DOC.read_text())


def test_document_is_valid_openapi() -> None:
    validate(_document())


def test_document_and_server_have_the_same_operations() -> None:
    documented = {(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
                  for path, item in _document()["paths"].items()
                  for method in item if method != "parameters"}
    served = {(route.method, re.sub(r"\{[^}]+\}", "{}", route.path)) for route in routes()}
    assert documented == served


def test_machine_config_schema_is_generated_from_the_declaration() -> None:
    from popek.api import openapi

    text = DOC.read_text()
    assert openapi.rewrite(text) == text, "run: python -m popek.api.openapi"


def test_every_operation_answers_401_and_those_naming_host_paths_403() -> None:
    document = _document()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            statuses = set(operation["responses"])
            assert "401" in statuses, (method, path)
            takes_paths = operation["operationId"] in ("createVm", "restoreVm", "snapshotVm",
                                                       "migrateVm", "expectMigration")
            assert ("403" in statuses) == takes_paths, (method, path)
