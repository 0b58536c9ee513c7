"""Every reason the services put in an ErrorInfo is declared once, in the protos
(agentplatform.errors.v1.ErrorReason, AIP-193): read from the source, compared with it."""

from __future__ import annotations

import ast
from pathlib import Path

from agentplatform.errors.v1 import errors_pb2

from tests.helpers import ROOT

DECLARED = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def reasons_in_the_code() -> dict[str, list[str]]:
    """Each `reason="…"` given to an error class (a capitalized callee) and each
    `default_reason = "…"`, in services/ and shared/."""
    found: dict[str, list[str]] = {}
    sources = sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "shared").rglob("*.py"))
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call) and _callee(node)[:1].isupper():
                values += [k.value for k in node.keywords if k.arg == "reason"]
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "default_reason" for t in targets):
                    values.append(node.value)
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    where = f"{Path(path).relative_to(ROOT)}:{value.lineno}"
                    found.setdefault(value.value, []).append(where)
    return found


def test_every_reason_sent_is_declared_in_the_protos() -> None:
    found = reasons_in_the_code()
    assert found, "the scan found no reason at all"
    undeclared = {reason: where for reason, where in found.items() if reason not in DECLARED}
    assert not undeclared, f"declare these in protos/agentplatform/errors/v1: {undeclared}"


def test_the_scan_sees_reasons_in_both_services_and_the_shared_code() -> None:
    places = {where.split("/")[0] for wheres in reasons_in_the_code().values() for where in wheres}
    assert places == {"services", "shared"}
