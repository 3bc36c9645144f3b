"""The envelope schema, loaded once, with a validator that checks formats.

Used by test_producers.py and, as a program, by the Rust test
tests/envelope_schema.rs: it reads {"documents": [...]} on stdin and prints
one list of error messages per document ([] when the document is valid).
"""

import json
import sys
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "schema" / "event-envelope.schema.json"


def validator() -> jsonschema.Draft202012Validator:
    """A draft 2020-12 validator of the envelope schema that asserts formats.

    Fails when the `date-time` format cannot be checked (jsonschema checks it
    only when `rfc3339-validator` is installed, and silently passes it
    otherwise).
    """
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    if checker.conforms("2026-13-01T00:00:00Z", "date-time"):
        raise RuntimeError(
            "jsonschema cannot check the date-time format: "
            "pip install rfc3339-validator (scripts/pyenv.sh installs it)"
        )
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def errors(v: jsonschema.Draft202012Validator, document) -> list[str]:
    """The messages of every error of `document`, [] when it is valid."""
    return [error.message for error in v.iter_errors(document)]


def main() -> int:
    v = validator()
    documents = json.load(sys.stdin)["documents"]
    json.dump([errors(v, d) for d in documents], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
