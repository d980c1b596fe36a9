"""Reads Kubernetes YAML files and prints, as JSON, every container's args and env names.

Usage: deploy_yaml.py FILE...  -> [{"file", "kind", "name", "container", "args", "env"}, ...]
Exits non-zero (with the parser's message) when a file is not valid YAML.
"""
import json
import sys

import yaml


def containers(document):
    spec = (document.get("spec") or {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


found = []
for path in sys.argv[1:]:
    with open(path) as stream:
        for document in yaml.safe_load_all(stream):
            if not document:
                continue
            for container in containers(document):
                found.append({
                    "file": path,
                    "kind": document.get("kind"),
                    "name": document.get("metadata", {}).get("name"),
                    "container": container.get("name"),
                    "args": container.get("args", []),
                    "env": [entry["name"] for entry in container.get("env", [])],
                })
print(json.dumps(found))
