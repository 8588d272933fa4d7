"""The control API against its own OpenAPI document, with schemathesis, on a live daemon.

A node with one volume serves its API on TCP (TLS, an admin token); each operation of the
document (the one the daemon publishes at ``/openapi.json``, built here from the same code)
is sent requests that schemathesis generates from it, valid and not, and every answer must be
no server error (5xx) and match what the document says of that operation: its status codes,
content type, headers and body schema.  ``make test`` runs ``VOLKEEPER_FUZZ_API_EXAMPLES``
(15) examples per operation, ``make fuzz`` many more.  The node has no peers, so nothing
reaches beyond it; requests that change it (lock a volume, reload) do, and the checks hold in
every state they leave it in.  (schemathesis's own pytest plugin does not run under pytest 9,
so the operations are parametrized here and each one's strategy is driven by hypothesis.)
"""

from __future__ import annotations

import os
import warnings
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import NodeFactory
from volkeeper.daemon.api.control import create_app
from volkeeper_lab.launcher import LocalNode, VolumeSpec

EXAMPLES = int(os.environ.get("VOLKEEPER_FUZZ_API_EXAMPLES", "15"))
SCHEMA = schemathesis.openapi.from_dict(create_app(cast(Any, None)).openapi())
# What the document promises: no server error, and every answer as documented.  (Whether
# it documents every rule a request must follow -- name patterns, "at least one setting" --
# is positive_data_acceptance, not asked here: those rules are the API's own words.)
CHECKED = (
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
)  # fmt: skip
CHECKS = [check for check in schemathesis.checks.CHECKS.get_all() if check.__name__ in CHECKED]
OPERATIONS = {
    result.ok().label: result.ok()
    for result in SCHEMA.get_all_operations()
    if result.ok().path != "/events"  # an endless stream: tests/daemon/api/test_events.py
}


@pytest.fixture(scope="module")
def api_node(start_module_node: NodeFactory) -> LocalNode:
    return start_module_node("alpha", [VolumeSpec("data1", "4MiB")], control_tcp=True)


def test_the_document_here_is_the_one_the_daemon_publishes(api_node: LocalNode) -> None:
    with api_node.api() as api:
        published = api.get("/openapi.json").json()
    assert published == create_app(cast(Any, None)).openapi()


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_answer_is_no_server_error_and_matches_the_document(
    label: str, api_node: LocalNode
) -> None:
    base_url = f"https://127.0.0.1:{api_node.control_port}"
    headers = {"Authorization": f"Bearer {api_node.token}"}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=OPERATIONS[label].as_strategy())
    def check(case: Any) -> None:
        with warnings.catch_warnings():  # the test trusts its own daemon's certificate
            warnings.simplefilter("ignore")
            case.call_and_validate(
                base_url=base_url, headers=headers, checks=CHECKS, verify=False, timeout=30
            )

    assert len(CHECKS) == len(CHECKED)
    check()
