"""What a name or a tag names on an hf:// remote now (`HFRemote.current`), from one listing of the repo's git tags.

No hub is reachable here: the unit tests replace the client's `HfApi` by a repo's refs in memory, each call bound to
the real method's signature (so a drifted call fails here as it would there); the `hub serve` process test runs the
real client against the refs endpoint served on a localhost port, its pulls reading a local HF cache through the real
`snapshot_download`, as in test_remotes_hf."""
from __future__ import annotations

import threading
import time

import pytest
from huggingface_hub.hf_api import GitRefInfo, GitRefs

from hub.errors import NotFound, RemoteError
from hub.registry import Registry
from hub.remotes.hf import REFS_SECONDS_VAR, HFRemote
from tests.test_remotes_hf import populate_hf_cache, stage


class FakeRefs:
    """One Hub repo's tags (name -> commit), answering `list_repo_refs`; `down` makes every call fail as an
    unreachable Hub does, `missing` as a repo that does not exist."""

    def __init__(self, tags: dict[str, str]):
        self.tags, self.calls, self.down, self.missing = dict(tags), 0, False, False

    def list_repo_refs(self, *args, **kwargs) -> GitRefs:
        import inspect

        import httpx2
        from huggingface_hub.errors import RepositoryNotFoundError
        from huggingface_hub.hf_api import HfApi  # the real class: the tests patch huggingface_hub.HfApi

        inspect.signature(HfApi.list_repo_refs).bind(self, *args, **kwargs)
        self.calls += 1
        if self.down:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        if self.missing:
            raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=httpx2.Request(
                "GET", f"https://huggingface.co/api/models/{args[0]}/refs")))
        return GitRefs(branches=[GitRefInfo("main", "refs/heads/main", "c2")], converts=[],
                       tags=[GitRefInfo(n, f"refs/tags/{n}", c) for n, c in self.tags.items()])


@pytest.fixture
def hub_refs(monkeypatch) -> FakeRefs:
    import huggingface_hub

    refs = FakeRefs({"v1.0.0": "c1", "v2.0.0": "c2", "v1.5.0-rc.1": "c3", "prod": "c1", "wip": "c9"})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: refs)
    return refs


def test_a_name_and_a_tag_are_answered_from_one_listing(hub_refs, monkeypatch):
    monkeypatch.setenv(REFS_SECONDS_VAR, "3600")
    remote = HFRemote("acme/moving")
    assert remote.current("mine/moving") == "mine/moving@2.0.0"  # the highest version tag; the local name kept
    assert remote.current("acme/moving@prod") == "acme/moving@1.0.0"  # the version tagged on the tag's commit
    assert remote.current("acme/moving@wip") is None  # a tag on a commit no version names: the remote cannot say
    with pytest.raises(NotFound, match=r"hf://acme/moving has no tag 'nope'"):
        remote.current("acme/moving@nope")
    assert hub_refs.calls == 1
    hub_refs.tags = {"prod": "c1"}  # a plain PEFT repo: no version tags
    assert HFRemote("acme/plain").current("acme/plain") is None


def test_a_burst_costs_one_listing_and_a_moved_tag_is_seen_after_the_listing_time(hub_refs, monkeypatch):
    monkeypatch.setenv(REFS_SECONDS_VAR, "3600")
    remote = HFRemote("acme/moving")
    answers: list[str | None] = []
    threads = [threading.Thread(target=lambda: answers.append(remote.current("acme/moving@prod"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == ["acme/moving@1.0.0"] * 8 and hub_refs.calls == 1
    hub_refs.tags.update({"v3.0.0": "c4", "prod": "c4"})
    assert remote.current("acme/moving@prod") == "acme/moving@1.0.0"  # still within the listing's time
    monkeypatch.setenv(REFS_SECONDS_VAR, "0.05")
    short = HFRemote("acme/moving")
    assert short.current("acme/moving@prod") == "acme/moving@3.0.0"
    hub_refs.tags["prod"] = "c2"
    time.sleep(0.1)  # past the listing's time (a lower bound: the answer cannot come from the old listing)
    assert (short.current("acme/moving@prod"), short.current("acme/moving")) == ("acme/moving@2.0.0",
                                                                                  "acme/moving@3.0.0")


def test_an_outage_answers_from_the_last_listing_or_leaves_it_to_the_local_registry(hub_refs, monkeypatch):
    monkeypatch.setenv(REFS_SECONDS_VAR, "0")  # list on every call
    remote = HFRemote("acme/moving")
    assert remote.current("acme/moving@prod") == "acme/moving@1.0.0"
    hub_refs.down = True
    assert remote.current("acme/moving@prod") == "acme/moving@1.0.0"  # what was served so far
    assert remote.current("acme/moving") == "acme/moving@2.0.0"
    with pytest.raises(RemoteError, match=r"^hf://acme/moving: cannot list tags \(ConnectionError: Failed to"):
        HFRemote("acme/moving").current("acme/moving")  # never listed: the pool's local registry answers
    monkeypatch.setenv(REFS_SECONDS_VAR, "3600")
    calls, fresh = hub_refs.calls, HFRemote("acme/moving")
    for _ in range(5):
        with pytest.raises(RemoteError):
            fresh.current("acme/moving")
    assert hub_refs.calls == calls + 1  # a failed listing is kept for its time too: an outage costs one call
    hub_refs.down, hub_refs.missing = False, True
    with pytest.raises(NotFound, match="hf://acme/gone: no such repo"):
        HFRemote("acme/gone").current("acme/gone")


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_listing_time_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(REFS_SECONDS_VAR, value)
    with pytest.raises(RemoteError, match=rf"^{REFS_SECONDS_VAR}='{value}': give a number of seconds, 0 or more$"):
        HFRemote("acme/moving")


class LocalHub:
    """The Hub's refs endpoint (`GET /api/models/ORG/REPO/refs`, as `list_repo_refs` reads it) on a localhost port,
    answering from `tags`; any other call gets a 500, on which `snapshot_download` reads the local HF cache."""

    def __init__(self, repo_id: str, tags: dict[str, str]):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.tags, self.calls = dict(tags), 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != f"/api/models/{repo_id}/refs":
                    self.send_error(500)
                    return
                hub.calls += 1
                body = json.dumps({"branches": [], "converts": [], "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in hub.tags.items()]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """The Hub goes away: its port refuses connections."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.mark.slow  # `hub serve` as a process
def test_a_hub_serve_process_lists_the_tags_over_http_and_serves_what_they_name_now(served_base, served_adapters,
                                                                                    tmp_path):
    """The real client end to end: `hub serve --remote hf://...` lists the tags over HTTP from a Hub on a localhost
    port (HF_ENDPOINT) on each request (HUB_HF_REFS_SECONDS=0), pulls through the real `snapshot_download` from the
    HF cache; a version pushed and a tag moved there are served by the next request, and when the Hub is gone the
    versions served so far stay."""
    from runtime.client import RuntimeClient
    from tests.test_server_process import ServeProcess

    publisher, hf_home = Registry(tmp_path / "publisher"), tmp_path / "hf"

    def publish(adapter: str, version: str) -> None:
        manifest = publisher.push(served_adapters[adapter], "acme/moving", version, base_model=str(served_base))
        folder = tmp_path / f"staged-{version}"
        folder.mkdir()
        stage(manifest, publisher, folder)
        populate_hf_cache(hf_home, "acme/moving", folder, [f"v{version}"])

    publish("lora1", "1.0.0")
    hub = LocalHub("acme/moving", {"v1.0.0": "c1", "prod": "c1"})
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", REFS_SECONDS_VAR: "0",
           "HUB_HOME": str(tmp_path / "replica")}
    serve = ServeProcess("--base-model", str(served_base), "--remote", "hf://acme/moving", env=env)
    try:
        with RuntimeClient(serve.address, timeout=120) as client:
            def served(ref: str) -> str:
                return client.generate("Hello there, adapters!", adapters=[ref], max_new_tokens=2).adapters[0].ref

            assert served("acme/moving") == served("acme/moving@prod") == "acme/moving@1.0.0"
            publish("lora2", "2.0.0")
            hub.tags["v2.0.0"] = "c2"
            assert (served("acme/moving"), served("acme/moving@prod")) == ("acme/moving@2.0.0", "acme/moving@1.0.0")
            hub.tags["prod"] = "c2"
            assert served("acme/moving@prod") == "acme/moving@2.0.0"
            assert hub.calls == 5  # one listing per request
            hub.stop()
            assert (served("acme/moving"), served("acme/moving@prod")) == ("acme/moving@2.0.0", "acme/moving@2.0.0")
        assert serve.terminate() == 0
        assert "Traceback" not in "".join(serve.lines)
    finally:
        serve.kill()
        if hub.thread.is_alive():
            hub.stop()


@pytest.mark.slow  # `hub serve` as a process
def test_hub_serve_refuses_a_bad_listing_time_in_one_line(served_base, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HUB_HOME": str(tmp_path / "home"), REFS_SECONDS_VAR: "soon"}
    result = subprocess.run([sys.executable, "-m", "hub", "serve", "--base-model", str(served_base), "--port", "0",
                             "--remote", "hf://acme/moving"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # after the loading bars
    assert errors == [f"error: {REFS_SECONDS_VAR}='soon': give a number of seconds, 0 or more"]
