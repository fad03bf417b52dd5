"""End to end: the real `audience-sync` command against loopback servers that behave like the destinations."""

import json

from tests.conftest import Config, Customers, run_cli
from tests.servers import EverflowServer, RefersionServer

EVENTS = {"Audience Entered": 7, "Audience Exited": 8}


def everflow_destination(config: Config, server: EverflowServer, **settings: object) -> int:
    return config.destination(
        "Everflow",
        "everflow",
        {
            "tracking_domain": server.url,
            "network_id": "1",
            "event_mapping": EVENTS,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            **settings,
        },
    )


def refersion_destination(config: Config, server: RefersionServer, **settings: object) -> int:
    return config.destination(
        "Refersion",
        "refersion",
        {"api_base": server.url + "/v2", "backoff_initial": 0.01, "backoff_max": 0.05, **settings},
        api_key="pub.sec",
    )


def test_initial_then_unchanged_then_churn(state_url: str, config: Config, customers: Customers) -> None:
    customers.add("u1", "u2", "u3")
    with EverflowServer() as everflow, RefersionServer() as refersion:
        audience = config.audience("VIP Customers", Customers.QUERY)
        config.connect(audience, everflow_destination(config, everflow))
        config.connect(audience, refersion_destination(config, refersion, on_exit="disable"))

        first = run_cli(state_url, "initial")
        assert first.returncode == 0, first.stderr
        assert everflow.accepted == {("tid-u1", "7"): 1, ("tid-u2", "7"): 1, ("tid-u3", "7"): 1}
        assert sorted(k for (k,) in [(a["unique_merchant_id"],) for a in refersion.affiliates.values()]) == [
            "u1",
            "u2",
            "u3",
        ]

        second = run_cli(state_url, "run")
        assert second.returncode == 0, second.stderr
        assert len(everflow.requests) == 3 and len(refersion.requests) == 3

        customers.move("u2", segment="lapsed")
        customers.add("u4")
        third = run_cli(state_url, "run")
        assert third.returncode == 0, third.stderr
        assert everflow.accepted == {
            ("tid-u1", "7"): 1,
            ("tid-u2", "7"): 1,
            ("tid-u3", "7"): 1,
            ("tid-u4", "7"): 1,
            ("tid-u2", "8"): 1,
        }
        disabled = [a for a in refersion.affiliates.values() if a["status"] == "DISABLED"]
        assert [a["unique_merchant_id"] for a in disabled] == ["u2"]

        status = run_cli(state_url, "status", "--json")
        assert status.returncode == 0, status.stderr
        rows = {row["destination"]: row for row in json.loads(status.stdout)}
        assert rows["Everflow"]["members"] == 3 and rows["Everflow"]["accepted_members"] == 3
        assert rows["Refersion"]["last_run"]["outcome"] == "ok"
