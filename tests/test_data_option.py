"""Every command takes the data folder as --data; run and results (and the queue commands) also as --out."""

from __future__ import annotations

import json


def test_data_names_the_data_folder_everywhere(tmp_path, tiny_images, run_cli):
    data = tmp_path / "data"
    run_cli(["run", tiny_images(1), "--model", "resnet18", "--methods", "gradcam", "--topk", "1", "--device", "cpu",
             "--data", data])
    assert (data / "salient.db").is_file()
    job_id = json.loads(run_cli(["status", "--json", "--data", data]).output)["id"]
    for command in (["results"], ["export"], ["jobs"]):
        assert job_id in run_cli([*command, "--data", data]).output, command
    assert run_cli(["results", "--out", data]).output == run_cli(["results", "--data", data]).output
    report = run_cli(["report", "--data", data, "--out", tmp_path / "report"])
    assert (tmp_path / "report" / "index.html").is_file(), report.output
    empty = tmp_path / "empty"
    run_cli(["results", "--data", empty], expect_exit=1)  # another folder: no jobs there
