"""Submitting and scheduling on a KFP server: what the schedule helper and the README's `kfp` lines send.

No KFP API server runs here, so the client's API objects are the one fake: the real `kfp.Client`
methods (and the real `kfp` CLI commands, through click) build the request, and the fake records it.
"""

from __future__ import annotations

import re
import shlex

import kfp_server_api
import pytest
import yaml
from click.testing import CliRunner
from kfp import Client

from pipelines.hivlp_pipeline import PIPELINE_YAML, create_schedule, main

from .conftest import REPO

README = REPO / "pipelines" / "README.md"


class FakeApis:
    """The run and recurring-run services of a KFP API server: record what is created."""

    def __init__(self) -> None:
        self.runs: list = []
        self.recurring_runs: list = []

    def run_service_create_run(self, run):
        self.runs.append(run)
        return kfp_server_api.V2beta1Run(run_id="run-1", display_name=run.display_name,
                                         experiment_id=run.experiment_id, state="PENDING")

    def run_service_get_run(self, run_id, **kw):
        return kfp_server_api.V2beta1Run(run_id=run_id, display_name="hivlp", state="PENDING")

    def recurring_run_service_create_recurring_run(self, recurring_run):
        self.recurring_runs.append(recurring_run)
        return kfp_server_api.V2beta1RecurringRun(recurring_run_id="rr-1", display_name=recurring_run.display_name,
                                                  mode=recurring_run.mode)


def _fake_client() -> tuple[Client, FakeApis]:
    apis = FakeApis()
    client = Client.__new__(Client)  # __init__ would contact a server
    client._run_api = client._recurring_run_api = apis
    client._uihost = "http://kfp.test"  # where run links point
    client.create_experiment = lambda name, **kw: kfp_server_api.V2beta1Experiment(experiment_id="exp-1",
                                                                                    display_name=name)
    return client, apis


def _wire(obj) -> dict:
    """The request body as JSON on the wire."""
    return kfp_server_api.ApiClient().sanitize_for_serialization(obj)


def _assert_is_the_compiled_pipeline(pipeline_spec: dict, path=PIPELINE_YAML) -> None:
    """The body carries the compiled YAML: both documents (pipeline spec + kfp-kubernetes platform spec)."""
    pipeline, platform = yaml.safe_load_all(path.read_text())
    assert pipeline_spec == {"pipeline_spec": pipeline, "platform_spec": platform}


def test_schedule_helper_creates_an_enabled_nightly_run():
    client, apis = _fake_client()
    rid = create_schedule(client=client, params={"min_r_mean": 42.0})
    assert rid == "rr-1"
    (body,) = [_wire(r) for r in apis.recurring_runs]
    assert body["mode"] == "ENABLE"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["max_concurrency"] == 1 and body["no_catchup"] is True
    assert (body["experiment_id"], body["display_name"]) == ("exp-1", "hivlp-nightly")
    assert body["runtime_config"]["parameters"] == {"min_r_mean": 42.0}
    _assert_is_the_compiled_pipeline(body["pipeline_spec"])
    # Caching is left to each task (setting it here would re-enable the uncached fingerprint).
    fingerprint = body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]["fingerprint-dataset"]
    assert fingerprint["cachingOptions"] == {}


def test_schedule_command_line_passes_parameters(monkeypatch):
    client, apis = _fake_client()
    monkeypatch.setattr("kfp.Client", lambda host: client)
    assert main(["schedule", "--host", "http://kfp:8080", "--cron", "0 30 1 * * *", "num_shards=8"]) == 0
    (body,) = [_wire(r) for r in apis.recurring_runs]
    assert body["mode"] == "ENABLE" and body["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * *"
    assert body["runtime_config"]["parameters"] == {"num_shards": "8"}
    with pytest.raises(SystemExit):
        main(["schedule", "--host", "http://kfp:8080", "num_shards"])


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell lines that start with `kfp --endpoint URL <prefix>`, as argv after the endpoint."""
    text = README.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if re.match(rf"kfp --endpoint \S+ {prefix}\b", line):
            argv = shlex.split(line.split("#", 1)[0].replace('"$(date +%F)"', "today"))
            out.append(argv[3:])  # drop `kfp --endpoint URL`
    return out


def test_readme_leads_with_run_create_and_it_submits_the_compiled_yaml(monkeypatch):
    from kfp.cli import run

    monkeypatch.chdir(REPO)
    text = README.read_text()
    first_kfp = re.search(r"^kfp .*$", text, re.M).group(0)
    assert "run create -e hivlp -f pipelines/hivlp.yaml" in first_kfp
    assert re.search(r"`kfp run submit` is the deprecated alias of\s+`kfp run create`", text)

    lines = _readme_commands("run create")
    assert len(lines) == 3  # the leading line, and the two of step 4
    for argv in lines:
        client, apis = _fake_client()
        result = CliRunner().invoke(run.run, argv[1:], obj={"client": client, "output": "json"},
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (body,) = [_wire(r) for r in apis.runs]
        assert body["experiment_id"] == "exp-1"
        package = REPO / argv[argv.index("-f") + 1]
        _assert_is_the_compiled_pipeline(body["pipeline_spec"], package)
        params = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
        assert set(body["runtime_config"]["parameters"]) == set(params)


def test_readme_recurring_run_line_creates_an_enabled_schedule(monkeypatch):
    """The README's `kfp recurring-run create` line through the real CLI: ENABLE (the CLI's default,
    without --enabled, is a paused schedule)."""
    from kfp.cli import recurring_run

    monkeypatch.chdir(REPO)
    (argv,) = _readme_commands("recurring-run create")
    assert "--enabled" in argv
    client, apis = _fake_client()
    result = CliRunner().invoke(recurring_run.recurring_run, argv[1:], obj={"client": client, "output": "json"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (body,) = [_wire(r) for r in apis.recurring_runs]
    assert body["mode"] == "ENABLE" and body["max_concurrency"] == 1 and body["no_catchup"] is True
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    _assert_is_the_compiled_pipeline(body["pipeline_spec"])

    # The same line without --enabled: what the README had before, a paused schedule.
    apis.recurring_runs.clear()
    CliRunner().invoke(recurring_run.recurring_run, [a for a in argv[1:] if a != "--enabled"],
                       obj={"client": client, "output": "json"}, catch_exceptions=False)
    assert _wire(apis.recurring_runs[0])["mode"] == "DISABLE"
