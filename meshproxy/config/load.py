"""Files -> documents, and the whole build (load, decode, keep last good, compile).

:func:`load_documents` reads YAML/JSON files (a path may be a file or a directory of
``*.yaml`` / ``*.yml`` / ``*.json``) into :class:`Document` bodies.  Documents of other API
groups (a Kubernetes Deployment in the same file) are skipped with a note.

:func:`build_from_paths` is what the proxy's bootstrap calls on start and on every change.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import yaml

from .compile import ProxyIdentity, WorkloadEndpoint, compile_snapshot
from .decode import CORE_KINDS, GROUPS, ResourceSet
from .incremental import ConfigBuilder
from .model import ProxySettings, Snapshot
from .resources import Document
from .yaml12 import load_all

__all__ = ["Document", "LoadResult", "BuildResult", "ValidateResult", "load", "load_documents", "build_from_paths",
           "config_files", "validate_paths"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# YAML is read with the YAML 1.2 core schema (yaml12.py), through libyaml when PyYAML has it
# Groups of mesh configuration a user may expect to act, which this proxy does not read:
# a warning each (other groups, such as a Deployment in the same file, are a note).
UNSUPPORTED_CONFIG_GROUPS = {
    "gateway.networking.k8s.io": "the Kubernetes Gateway API is not supported yet (use networking.istio.io "
                                 "Gateway and VirtualService)",
}


@dataclass(frozen=True, slots=True)
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed_sources: frozenset[str] = frozenset()   # files that could not be read or parsed
    warnings: list[str] = field(default_factory=list)   # mesh config this proxy does not read (Gateway API)


def config_files(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Every config file under ``paths`` in a stable order, and errors for missing paths."""
    files: list[str] = []
    errors: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names)
                             if n.endswith(CONFIG_SUFFIXES) and not n.startswith("."))
        elif os.path.isfile(path):
            files.append(path)
        else:
            errors.append(f"{path}: no such file or directory")
    return files, errors


def load(paths: Iterable[str]) -> LoadResult:
    files, errors = config_files(paths)
    documents: list[Document] = []
    notes: list[str] = []
    warnings: list[str] = []
    failed: set[str] = set()
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            bodies = [json.loads(text)] if path.endswith(".json") else list(load_all(text))
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{path}: cannot read: {exc}")
            failed.add(path)
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = getattr(exc, "problem", None) or str(exc)
            errors.append(f"{where}: YAML syntax error: {problem}")
            failed.add(path)
            continue
        except json.JSONDecodeError as exc:
            errors.append(f"{path}:{exc.lineno}:{exc.colno}: JSON syntax error: {exc.msg}")
            failed.add(path)
            continue
        if len(bodies) == 1 and isinstance(bodies[0], dict) and bodies[0].get("kind") == "List":
            bodies = bodies[0].get("items") or []          # kubectl get -o yaml of several objects
        for index, body in enumerate(bodies):
            if body is None:                                # empty document ("---" at the end)
                continue
            api_version = body.get("apiVersion") if isinstance(body, dict) else None
            group = api_version.split("/")[0] if isinstance(api_version, str) else ""
            if group in UNSUPPORTED_CONFIG_GROUPS:
                warnings.append(f"{path} document {index}: {body.get('kind', '?')} ({api_version}): "
                                f"{UNSUPPORTED_CONFIG_GROUPS[group]}; ignored")
                continue
            if api_version == "v1" and body.get("kind") in CORE_KINDS:
                documents.append(Document(path, index, body))     # a TLS Secret (Gateway credentialName)
                continue
            if isinstance(api_version, str) and group not in GROUPS:
                notes.append(f"{path} document {index}: {body.get('kind', '?')} ({api_version}) is not "
                             f"{' or '.join(GROUPS)}, ignored")
                continue
            documents.append(Document(path, index, body))
    return LoadResult(documents, errors, notes, frozenset(failed), warnings)


def load_documents(paths: list[str]) -> tuple[list[Document], list[str]]:
    """(documents, errors).  Errors name the file (and line for syntax errors)."""
    result = load(paths)
    return result.documents, result.errors


@dataclass(frozen=True, slots=True)
class BuildResult:
    snapshot: Snapshot | None          # None only when nothing could be read at all
    resource_set: ResourceSet          # what the snapshot was compiled from (pass back as ``previous``)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_from_paths(paths: list[str], identity: ProxyIdentity, settings: ProxySettings = ProxySettings(),
                     previous: ResourceSet | None = None,
                     workloads: Iterable[WorkloadEndpoint] = ()) -> BuildResult:
    """Load, decode, keep the last good version of each refused resource, compile.

    A resource whose new version is invalid keeps its ``previous`` version; a file with a
    syntax error keeps all its previous resources; resources no longer in the files are
    removed.  ``errors`` lists what was refused, ``warnings`` what was accepted with notes.
    """
    loaded = load(paths)
    errors = list(loaded.errors)
    notes = list(loaded.notes)
    all_paths_missing = paths and not loaded.documents and len(loaded.errors) >= len(paths) and \
        all(": no such file or directory" in e for e in loaded.errors)
    if all_paths_missing and not previous:
        return BuildResult(None, previous or ResourceSet(), errors, list(loaded.warnings), notes)
    # the one build path of both config sources (files and pushes): per-resource last good
    builder = ConfigBuilder(identity, settings)
    builder.resource_set = previous
    outcome = builder.build(loaded.documents, workloads, keep_sources=loaded.failed_sources)
    notes.extend(outcome.notes)
    if previous is not None:
        notes.extend(f"{path}: unreadable, its last good resources keep serving"
                     for path in sorted(loaded.failed_sources) if any(r.source == path for r in previous.values()))
    # decoder warnings travel with their resources into the compiler's: one copy of each
    return BuildResult(outcome.snapshot, builder.resource_set, errors + list(outcome.errors),
                       list(dict.fromkeys(list(loaded.warnings) + list(outcome.warnings))), notes)


@dataclass(frozen=True, slots=True)
class ValidateResult:
    errors: list[str]
    warnings: list[str]
    notes: list[str]
    resources: int


def validate_paths(paths: list[str], namespace: str = "default") -> ValidateResult:
    """What ``meshproxy validate`` reports: every decode error, and every warning the whole
    compiler gives for the proxies these files configure: a sidecar in each namespace the
    resources live in (and ``namespace``), and each Gateway's own proxy (gateway mode, its
    selector as labels), so that a warning only a gateway sees (an unsupported TLS mode, a
    server without routes) shows here as it would in ``meshctl apply``."""
    built = build_from_paths(paths, ProxyIdentity(namespace=namespace))
    warnings = list(built.warnings)
    resources = built.resource_set.resources()
    identities = [ProxyIdentity(namespace=ns) for ns in sorted({r.namespace for r in resources} - {namespace})]
    identities += [ProxyIdentity(namespace=r.namespace, labels=r.spec.selector, mode="gateway",
                                 http_listen=("127.0.0.1", 0), gateway_bind="127.0.0.1")
                   for r in resources if r.kind == "Gateway"]
    seen = set(warnings)
    for identity in identities:
        for w in compile_snapshot(resources, identity, ProxySettings(), version="validate").warnings:
            if w not in seen:
                seen.add(w)
                warnings.append(w)
    return ValidateResult(list(built.errors), warnings, list(built.notes), len(resources))
