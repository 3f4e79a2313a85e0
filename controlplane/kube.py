"""Kubernetes API conventions, as pure functions over plain dicts (no I/O).

What kubectl, client-go and the official Python client expect of an API server, for the kinds
in :mod:`.resources`: discovery documents, label and field selectors, ``limit``/``continue``
tokens, JSON merge patch (RFC 7386) and JSON patch (RFC 6902), server-side apply with field
managers, and the ``meta.k8s.io/v1`` Table that ``kubectl get`` prints.  ``api.py`` wires
them to routes; everything here is testable without a server.

Server-side apply follows Kubernetes' rules for custom resources whose lists are atomic (the
default for a CRD, and what Istio's CRDs declare): each manager owns a set of leaf paths (a list
counts as one leaf); applying a value another manager owns with a different value is a conflict
(409, causes ``FieldManagerConflict``) unless ``force``; equal values are shared; fields an
applier stops sending are removed when no other manager owns them.  Non-apply writes (POST,
PUT, merge/JSON patch) never conflict: the writer takes ownership of what it changed.
"""
from __future__ import annotations

import base64
import calendar
import copy
import json
import re
import time
from dataclasses import dataclass

from .resources import CORE_KINDS, GROUPS, Kind
from .store import ApplyConflict, BadRequest, Gone, Invalid, UnsupportedMediaType

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-meshproxy", "gitCommit": "",
                  "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "python3",
                  "compiler": "cpython", "platform": "linux/amd64"}


# ---------------------------------------------------------------- discovery


def api_versions() -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}


def core_resources() -> dict:
    """``/api/v1``: namespaces (read-only: a namespace exists while something is in it) and the
    core kinds the control plane stores (Secrets)."""
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "verbs": ["get", "list"], "shortNames": ["ns"]},
        *({"name": k.plural, "singularName": k.singular, "namespaced": True, "kind": k.kind, "verbs": list(k.verbs),
           "shortNames": list(k.short)} for k in CORE_KINDS)]}


def namespace_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def _versions_of(kinds: tuple[Kind, ...]) -> list[str]:
    return list(dict.fromkeys(v for k in kinds for v in k.versions))


def api_group(group: str) -> dict | None:
    kinds = GROUPS.get(group)
    if not kinds:
        return None
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in _versions_of(kinds)]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
            "preferredVersion": versions[0]}


def api_group_list() -> dict:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(g) for g in GROUPS]}


def api_resource_list(group: str, version: str) -> dict | None:
    kinds = [k for k in GROUPS.get(group, ()) if version in k.versions]
    if not kinds:
        return None
    resources = []
    for k in kinds:
        resources.append({"name": k.plural, "singularName": k.singular, "namespaced": True, "kind": k.kind,
                          "verbs": list(k.verbs), "shortNames": list(k.short), "categories": list(k.categories)})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}",
            "resources": resources}


# ---------------------------------------------------------------- selectors

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_REQ = re.compile(r"^\s*(?P<neg>!)?\s*(?P<key>[^\s!=<>(),]+)\s*(?:(?P<op>==|!=|=|<|>|\bnotin\b|\bin\b)\s*"
                  r"(?:\((?P<set>[^)]*)\)|(?P<val>[^\s,()]*))\s*)?$")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str                         # exists | !exists | = | != | in | notin | < | >
    values: tuple[str, ...] = ()

    def matches(self, labels: dict) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        try:                         # < and >: integers only; a non-integer label does not match
            number = int(value) if present else None
        except ValueError:
            return False
        if number is None:
            return False
        return number < int(self.values[0]) if self.op == "<" else number > int(self.values[0])


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """``app=x,tier in (a,b),!legacy`` -> requirements (all must hold); BadRequest if malformed."""
    out = []
    for part in _split_top_level(text or ""):
        m = _REQ.match(part)
        if not m:
            raise BadRequest(f"unable to parse requirement: {part.strip()!r} in labelSelector {text!r}")
        key, op, neg = m["key"], m["op"], m["neg"]
        if not _KEY.match(key):
            raise BadRequest(f"labelSelector {text!r}: invalid label key {key!r}")
        if op is None:
            out.append(Requirement(key, "!exists" if neg else "exists"))
            continue
        if neg:
            raise BadRequest(f"labelSelector {text!r}: '!' only negates an existence test")
        if op in ("in", "notin"):
            if m["set"] is None:
                raise BadRequest(f"labelSelector {text!r}: {op} needs a parenthesised set of values")
            values = tuple(v.strip() for v in m["set"].split(","))
        else:
            if m["val"] is None:
                raise BadRequest(f"labelSelector {text!r}: {op} needs one value")
            values = (m["val"],)
            op = "=" if op == "==" else op
        for v in values:
            if not _VALUE.match(v):
                raise BadRequest(f"labelSelector {text!r}: invalid label value {v!r}")
            if op in ("<", ">") and not re.fullmatch(r"-?\d+", v):
                raise BadRequest(f"labelSelector {text!r}: {op} needs an integer, got {v!r}")
        out.append(Requirement(key, op, values))
    return tuple(out)


FIELD_SELECTABLE = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str) -> tuple[tuple[str, str, str], ...]:
    """``metadata.name=x,metadata.namespace!=y`` -> (field, op, value); custom resources support
    only metadata.name and metadata.namespace (anything else is a 400, as in Kubernetes)."""
    out = []
    for part in (p for p in (text or "").split(",") if p.strip()):
        m = re.match(r"^\s*([^=!\s]+)\s*(==|!=|=)\s*(\S*)\s*$", part)
        if not m:
            raise BadRequest(f"invalid field selector: {part.strip()!r}")
        field, op, value = m.groups()
        if field not in FIELD_SELECTABLE:
            raise BadRequest(f'field label not supported: {field} (supported: {", ".join(FIELD_SELECTABLE)})')
        out.append((field, "!=" if op == "!=" else "=", value))
    return tuple(out)


def selected(obj: dict, labels: tuple[Requirement, ...], fields: tuple[tuple[str, str, str], ...]) -> bool:
    md = obj.get("metadata") or {}
    own = md.get("labels") or {}
    if not all(r.matches(own) for r in labels):
        return False
    for field, op, value in fields:
        actual = md.get(field.split(".", 1)[1], "")
        if (actual == value) != (op == "="):
            return False
    return True


# ---------------------------------------------------------------- limit / continue


def continue_token(resource_version: str, after: tuple[str, str]) -> str:
    raw = json.dumps({"rv": resource_version, "after": list(after)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_continue(token: str) -> tuple[str, tuple[str, str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return str(data["rv"]), (str(data["after"][0]), str(data["after"][1]))
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadRequest(f"continue: invalid token {token!r}") from None


def page(items: list[dict], limit: int | None, token: str | None, resource_version: str) -> tuple[list[dict], dict]:
    """One page of ``items`` (sorted by namespace, name) and the list metadata to send with it.
    A continued list keeps the first page's resourceVersion and resumes after the last key it
    returned.  No snapshot is kept: an object changed between two pages shows its current state
    (Kubernetes serves continued pages from the first page's snapshot)."""
    meta: dict = {"resourceVersion": resource_version}
    if token:
        first_rv, after = parse_continue(token)
        meta["resourceVersion"] = first_rv
        items = [o for o in items if (o["metadata"]["namespace"], o["metadata"]["name"]) > after]
    if limit and limit > 0 and len(items) > limit:
        rest = len(items) - limit
        items = items[:limit]
        last = items[-1]["metadata"]
        meta["continue"] = continue_token(meta["resourceVersion"], (last["namespace"], last["name"]))
        meta["remainingItemCount"] = rest
    return items, meta


# ---------------------------------------------------------------- patches


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise BadRequest(f"json patch: path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, tokens: list[str], path: str):
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise BadRequest(f"json patch: path {path!r} does not exist")
    return doc


def _add(doc, tokens: list[str], value, path: str):
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise BadRequest(f"json patch: index in {path!r} is out of range")
    else:
        raise BadRequest(f"json patch: parent of {path!r} is not an object or array")
    return doc


def _remove(doc, tokens: list[str], path: str):
    if not tokens:
        raise BadRequest("json patch: cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise BadRequest(f"json patch: path {path!r} does not exist")


def json_patch(target: dict, operations) -> dict:
    """RFC 6902: add, remove, replace, move, copy, test; all or nothing."""
    if not isinstance(operations, list):
        raise BadRequest("json patch: the body must be an array of operations")
    doc = copy.deepcopy(target)
    for i, op in enumerate(operations):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise BadRequest(f"json patch: operation {i} needs 'op' and 'path'")
        name, path = op["op"], op["path"]
        tokens = _pointer(path)
        if name in ("add", "replace", "test") and "value" not in op:
            raise BadRequest(f"json patch: operation {i} ({name}) needs 'value'")
        if name == "add":
            doc = _add(doc, tokens, copy.deepcopy(op["value"]), path)
        elif name == "remove":
            _remove(doc, tokens, path)
        elif name == "replace":
            _walk(doc, tokens, path)
            if tokens:
                _remove(doc, tokens, path)
            doc = _add(doc, tokens, copy.deepcopy(op["value"]), path)
        elif name in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise BadRequest(f"json patch: operation {i} ({name}) needs 'from'")
            from_tokens = _pointer(source)
            value = _remove(doc, from_tokens, source) if name == "move" else copy.deepcopy(_walk(doc, from_tokens, source))
            doc = _add(doc, tokens, value, path)
        elif name == "test":
            if _walk(doc, tokens, path) != op["value"]:
                raise Invalid(f"json patch: test failed at {path!r}")
        else:
            raise BadRequest(f"json patch: unknown operation {name!r}")
    if not isinstance(doc, dict):
        raise BadRequest("json patch: the result must be an object")
    return doc


# ---------------------------------------------------------------- field ownership (server-side apply)

OWNED_ROOTS = (("spec",), ("metadata", "labels"), ("metadata", "annotations"))
SECRET_ROOTS = (("type",), ("data",), ("immutable",), ("metadata", "labels"), ("metadata", "annotations"))
Path = tuple[str, ...]


def owned_roots(obj: dict | None) -> tuple[Path, ...]:
    """Where a manager's fields live: ``spec``, or a Secret's type/data/immutable; and labels, annotations."""
    return SECRET_ROOTS if (obj or {}).get("kind") == "Secret" else OWNED_ROOTS


def leaf_paths(obj: dict) -> dict[Path, object]:
    """Every owned leaf of an object: maps are walked, lists and scalars are leaves."""
    out: dict[Path, object] = {}

    def walk(value, path: Path):
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(child, path + (key,))
        else:
            out[path] = value

    for root in owned_roots(obj):
        value = obj
        for key in root:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            walk(value, root)
    return out


def fields_v1(paths) -> dict:
    """Paths -> Kubernetes' FieldsV1 (``{"f:spec": {"f:hosts": {}}}``)."""
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def paths_of(fields: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, child in (fields or {}).items():
        if not key.startswith("f:"):
            continue
        path = prefix + (key[2:],)
        if child:
            out |= paths_of(child, path)
        else:
            out.add(path)
    return out


def _overlaps(a: Path, b: Path) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _get(obj: dict, path: Path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


_MISSING = object()


def _delete(obj: dict, path: Path) -> None:
    parents = []
    node = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in reversed(parents):       # drop maps left empty (not the roots' own keys)
        if parent[key] == {} and (parent is not obj):
            parent.pop(key)


def _set(obj: dict, path: Path, value) -> None:
    node = obj
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _entries(live: dict | None) -> list[dict]:
    return [dict(e) for e in ((live or {}).get("metadata") or {}).get("managedFields") or []]


def _entry(manager: str, operation: str, api_version: str, paths) -> dict:
    return {"manager": manager, "operation": operation, "apiVersion": api_version, "time": _now(),
            "fieldsType": "FieldsV1", "fieldsV1": fields_v1(paths)}


def apply(live: dict | None, applied: dict, manager: str, force: bool) -> dict:
    """Server-side apply of ``applied`` by ``manager`` onto ``live`` (None: create).  Returns the
    new object (metadata.managedFields updated); raises ApplyConflict."""
    entries = _entries(live)
    mine_before: set[Path] = set()
    for e in entries:
        if e["manager"] == manager and e.get("operation") == "Apply":
            mine_before = paths_of(e.get("fieldsV1"))
    applied_leaves = leaf_paths(applied)
    base = copy.deepcopy(live) if live is not None else {"metadata": {}}
    conflicts = []
    for e in entries:
        if e["manager"] == manager and e.get("operation") == "Apply":
            continue
        owned = paths_of(e.get("fieldsV1"))
        taken = set()
        for path in owned:
            for new_path, value in applied_leaves.items():
                if _overlaps(path, new_path) and _get(base, new_path) != value:
                    taken.add(path)
                    conflicts.append({"reason": "FieldManagerConflict", "field": "." + ".".join(path),
                                      "message": f'conflict with "{e["manager"]}"'
                                                 + (f' using {e.get("apiVersion")}' if e.get("apiVersion") else "")})
                    break
        if force and taken:
            e["fieldsV1"] = fields_v1(owned - taken)
    if conflicts and not force:
        n = len(conflicts)
        raise ApplyConflict(f"Apply failed with {n} conflict{'s' if n > 1 else ''}: "
                            + "; ".join(f"{c['message']}: {c['field']}" for c in conflicts), conflicts)
    others: set[Path] = set()
    for e in entries:
        if not (e["manager"] == manager and e.get("operation") == "Apply"):
            others |= paths_of(e.get("fieldsV1"))
    for path in mine_before:
        if path not in applied_leaves and not any(_overlaps(path, o) for o in others) \
                and not any(_overlaps(path, a) for a in applied_leaves):
            _delete(base, path)
    for path, value in applied_leaves.items():
        _set(base, path, value)
    roots = owned_roots(applied if applied.get("kind") else live)
    for root in roots:                           # an apply that owns no label leaves no empty map
        if _get(base, root) == {} and root != ("spec",):
            _delete(base, root)
    if roots is OWNED_ROOTS:
        base.setdefault("spec", {})
    kept = [e for e in entries if not (e["manager"] == manager and e.get("operation") == "Apply")
            and paths_of(e.get("fieldsV1"))]
    base["metadata"]["managedFields"] = kept + [_entry(manager, "Apply", applied.get("apiVersion", ""), applied_leaves)]
    for key in ("apiVersion", "kind"):
        if key in applied:
            base[key] = applied[key]
    return base


def record_update(live: dict | None, new: dict, manager: str) -> list[dict]:
    """managedFields after a non-apply write: the writer owns what it changed or added;
    others lose what it changed; removed fields leave every set."""
    before = leaf_paths(live) if live is not None else {}
    after = leaf_paths(new)
    changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
    removed = set(before) - set(after)
    out = []
    mine = None
    for e in _entries(live):
        owned = paths_of(e.get("fieldsV1"))
        if e["manager"] == manager and e.get("operation") == "Update":
            mine = owned
            continue
        owned = {p for p in owned if p not in removed and not any(_overlaps(p, c) for c in changed)}
        if owned:
            out.append(dict(e, fieldsV1=fields_v1(owned)))
    mine = ((mine or set()) - removed) | changed
    mine = {p for p in mine if p in after}
    if mine:
        out.append(_entry(manager, "Update", new.get("apiVersion", ""), mine))
    return out


def manager_from(query: dict, headers: dict) -> str:
    """``fieldManager``, else the User-Agent's program name (as the API server does)."""
    if query.get("fieldManager"):
        return query["fieldManager"][:128]
    agent = headers.get("user-agent", "unknown")
    return agent.split("/", 1)[0][:128] or "unknown"


# ---------------------------------------------------------------- Table


def human_duration(seconds: float) -> str:
    """An age as kubectl prints it (apimachinery's ``duration.HumanDuration``)."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    m, h = s // 60, s // 3600
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d{h % 24}h" if h % 24 else f"{h // 24}d"
    if h < 24 * 365 * 2:
        return f"{h // 24}d"
    if h < 24 * 365 * 8:
        return f"{h // 24 // 365}y{h // 24 % 365}d" if h // 24 % 365 else f"{h // 24 // 365}y"
    return f"{h // 24 // 365}y"


def _age(timestamp: str, now: float) -> str | None:
    try:
        then = calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return None
    return human_duration(now - then)


def _cell(obj: dict, column, now: float) -> object:
    value = obj
    for key in column.path.strip(".").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if column.type == "integer" and isinstance(value, dict):
        return len(value)                        # a Secret's DATA column: how many keys
    if value is None:
        return 0 if column.type == "integer" and column.path == ".data" else None
    if column.type == "date":
        return _age(value, now)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return value


def wants_table(accept: str) -> bool:
    return "as=Table" in (accept or "") and "g=meta.k8s.io" in accept


def partial_metadata(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(kind: Kind, items: list[dict], list_meta: dict, include_object: str = "Metadata",
          now: float | None = None) -> dict:
    now = time.time() if now is None else now
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    columns += [{"name": c.name, "type": c.type, "format": "", "priority": 0, "description": c.description}
                for c in kind.columns]
    rows = []
    for obj in items:
        cells = [obj["metadata"]["name"], *(_cell(obj, c, now) for c in kind.columns)]
        row = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
            "columnDefinitions": columns, "rows": rows}
