"""`hub push --batch FILE`: a bulk import from a JSON Lines list, one folder a line. Every line is checked
before anything is pushed (each bad one reported by its number), and a folder that fails mid-way removes
what the run had added, so a batch lands whole or not at all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.test_cli_registry import hub, one_line_error
from tests.test_registry import snapshot


def _write(file: Path, *lines: dict | str) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return file


def _adapters(technique_adapters, folder: Path, *techniques: str) -> Path:
    for technique in techniques:
        shutil.copytree(technique_adapters[technique], folder / technique)
    return folder


def test_a_batch_pushes_every_line_with_its_options(technique_adapters, tmp_path):
    folder = _adapters(technique_adapters, tmp_path / "import", "lora", "ia3", "bitfit")
    file = _write(folder / "list.jsonl",  # paths are taken from the list's folder, not the working directory
                  {"path": "lora", "name": "team/lora", "version": "1.0.0", "base_model": str(technique_adapters["base"])},
                  "",
                  {"path": "ia3", "name": "team/ia3", "version": "2.0.0", "tags": ["a", "b"], "description": "mine",
                   "license": None},
                  {"path": str(folder / "bitfit"), "name": "bitfit", "version": "1.0.0"})
    home = tmp_path / "home"
    out = hub("push", "--batch", file, "--license", "mit", "--tags", "bulk", "--description", "imported",
              home=home).stdout
    assert out.splitlines()[0].startswith("pushed team/lora@1.0.0 lora sha256:")
    assert "pushed team/ia3@2.0.0 ia3" in out and "pushed bitfit@1.0.0 bitfit" in out
    listed = {m["name"]: m for m in json.loads(hub("list", "--json", home=home).stdout)}
    assert listed["team/lora"]["base_model"]["fingerprint"] and listed["bitfit"]["base_model"]["id"] is None
    assert (listed["team/ia3"]["tags"], listed["team/ia3"]["description"], listed["team/ia3"]["license"]) == (
        ["a", "b"], "mine", None)  # a line's own keys win over the options
    assert (listed["bitfit"]["tags"], listed["bitfit"]["description"], listed["bitfit"]["license"]) == (
        ["bulk"], "imported", "mit")

    again = hub("push", "--batch", file, "--license", "mit", "--tags", "bulk", "--description", "imported",
                home=home).stdout  # the same list again: nothing to do
    assert again.count("unchanged ") == 3 and "pushed" not in again


def test_bad_lines_are_each_reported_with_their_number_and_nothing_is_pushed(technique_adapters, tmp_path):
    folder = _adapters(technique_adapters, tmp_path / "import", "lora")
    good = {"path": "lora", "name": "team/lora", "version": "1.0.0"}
    file = _write(folder / "list.jsonl", good, "not json", {**good, "path": "nope", "name": "team/x"},
                  {**good, "version": "2.0.0", "colour": 1}, "[1]", good, {**good, "version": "3.0.0", "tags": "a,b"},
                  {**good, "version": "v1"}, {"path": "lora", "name": "team/y"}, {**good, "name": "../evil"})
    home = tmp_path / "home"
    done = hub("push", "--batch", file, home=home, ok=False)
    assert done.exit_code == 1 and done.stdout == ""
    expected = [  # each line's problem (the name and version rules' own messages go on)
        f"error: {file}:2: not a JSON object (Expecting value: line 1 column 1 (char 0))",
        f"error: {file}:3: {folder / 'nope'}: not a folder",
        f"error: {file}:4: unknown key 'colour' (known: path, name, version, base_model, description, tags, license)",
        f"error: {file}:5: expected a JSON object, got list",
        f"error: {file}:6: team/lora@1.0.0 is also line 1",
        f"error: {file}:7: 'tags' must be a list of texts, got 'a,b'",
        f"error: {file}:8: invalid version 'v1'",
        f"error: {file}:9: missing 'version'",
        f"error: {file}:10: invalid adapter name '../evil'",
    ]
    lines = done.stderr.splitlines()
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected)), lines
    assert snapshot(home) == {}


def test_a_folder_that_fails_mid_batch_removes_what_the_batch_added(technique_adapters, tmp_path):
    folder = _adapters(technique_adapters, tmp_path / "import", "lora", "ia3", "bitfit")
    config = json.loads((folder / "bitfit" / "adapter_config.json").read_text())
    (folder / "bitfit" / "adapter_config.json").write_text(json.dumps({**config, "adapter_type": "unknown"}))
    home = tmp_path / "home"
    hub("push", folder / "lora", "--name", "team/lora", "--version", "1.0.0", home=home)
    before = snapshot(home)
    file = _write(folder / "list.jsonl", {"path": "lora", "name": "team/lora", "version": "1.0.0"},
                  {"path": "ia3", "name": "team/ia3", "version": "1.0.0"},
                  {"path": "bitfit", "name": "team/bitfit", "version": "1.0.0"})
    done = hub("push", "--batch", file, home=home, ok=False)
    one_line_error(done, f"{file}:3: team/bitfit@1.0.0 ({folder / 'bitfit'}): ")
    assert "unknown adapter config" in done.stderr
    assert "nothing was pushed (the 1 versions this run had added are removed)" in done.stderr
    assert snapshot(home) == before  # team/lora was there before the run, so it stays; team/ia3 and its blobs go
    assert [m["name"] for m in json.loads(hub("list", "--json", home=home).stdout)] == ["team/lora"]


def test_a_batch_takes_no_folders_names_or_remote_and_names_at_least_one_folder(technique_adapters, tmp_path):
    folder = _adapters(technique_adapters, tmp_path / "import", "lora")
    file = _write(folder / "list.jsonl", {"path": "lora", "name": "team/lora", "version": "1.0.0"})
    home = tmp_path / "home"
    for extra in (["lora"], ["--name", "x"], ["--version", "1.0.0"], ["--to", "origin"], ["--in-place"]):
        one_line_error(hub("push", "--batch", file, *extra, home=home, ok=False), "--batch takes no PATH")
    one_line_error(hub("push", "--batch", _write(tmp_path / "empty.jsonl", "", " "), home=home, ok=False),
                   "names no folder to push")
    one_line_error(hub("push", "--batch", tmp_path / "missing.jsonl", home=home, ok=False), "missing.jsonl")
    one_line_error(hub("push", home=home, ok=False), "give the adapter folder(s) to push, or --batch FILE")
    assert snapshot(home) == {}
