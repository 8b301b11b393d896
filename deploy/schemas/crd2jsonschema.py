"""Make strict JSON schemas (kubeconform style) for custom resources from their CRDs, for offline validation.

    python deploy/schemas/crd2jsonschema.py CRD.yaml VERSION OUT.json       # a CustomResourceDefinition
    python deploy/schemas/crd2jsonschema.py SCHEMA.json API_VERSION KIND OUT.json   # an openapi2jsonschema file

Strict = every object schema that lists `properties` (and does not set x-kubernetes-preserve-unknown-fields or
additionalProperties) rejects unknown keys, as `kubectl apply --validate=strict` / kubeconform -strict do;
apiVersion and kind are pinned; descriptions are dropped to keep the vendored files small; Go's inline `(?i)` becomes
[xX] classes (JSON Schema patterns are ECMA-262, which has no inline flags).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def case_insensitive(pattern: str) -> str:
    """Go RE2's inline `(?i)` has no ECMA-262 equivalent (JSON Schema's regex dialect): spell each letter
    outside a character class as [xX]."""
    out, in_class, escaped = [], False, False
    for ch in pattern:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            out.append(ch)
            escaped = True
        elif ch == "[":
            in_class = True
            out.append(ch)
        elif ch == "]":
            in_class = False
            out.append(ch)
        elif ch.isalpha() and not in_class:
            out.append(f"[{ch.lower()}{ch.upper()}]")
        else:
            out.append(ch)
    return "".join(out)


def strict(node):
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if k != "description"}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern:
        out["pattern"] = case_insensitive(pattern.replace("(?i)", ""))
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def finish(schema: dict, api_version: str, kind: str) -> dict:
    schema = strict(schema)
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "enum": [api_version]}
    props["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


def from_crd(crd_path: str, version: str) -> dict:
    import yaml

    crd = next(d for d in yaml.safe_load_all(Path(crd_path).read_text()) if d and d.get("kind") ==
               "CustomResourceDefinition")
    spec = crd["spec"]
    ver = next(v for v in spec["versions"] if v["name"] == version)
    return finish(ver["schema"]["openAPIV3Schema"], f"{spec['group']}/{version}", spec["names"]["kind"])


def main(argv: list[str]) -> int:
    if len(argv) == 3:
        schema = from_crd(argv[0], argv[1])
    elif len(argv) == 4:
        schema = finish(json.loads(Path(argv[0]).read_text()), argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[-1]).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
