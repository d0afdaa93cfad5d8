import json

from subllm.cli import main


def info_json(capsys, *args: str) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_reports_paper_parameter_counts(capsys):
    llama = info_json(capsys, "llama-1.3b")
    sub = info_json(capsys, "subllm-1.3b")
    assert abs(llama["parameters"] - 1.345e9) < 1e6
    assert sub["parameters"] == llama["parameters"] + 2 * 2048 + 2 * 2048
    assert abs(sub["block_compute_fraction"] - (10 + 10 * 0.64 + 4 * 0.64**2) / 24) < 1e-12
    assert [s["keep"] for s in sub["segments"]] == [0.64, 0.64]
    assert llama["segments"] == [] and llama["block_compute_fraction"] == 1.0
    assert sub["training_flops_per_token"] < llama["training_flops_per_token"]


def test_info_text_output(capsys):
    assert main(["info", "subllm-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "1,345,431,552" in out and "block compute 0.752" in out
    assert "TTTTT(TTTTT(TTTT)TTTTT)TTTTT" in out


def test_info_bad_input_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('preset: subllm-tiny\nstructure: "TTT(TT(TT)TT)TT("\n')
    for args, fragment in ((["nope"], "unknown preset 'nope'"),
                           ([str(bad)], "position 15 is never closed"),
                           ([str(tmp_path / "missing.yaml")], "does not exist")):
        assert main(["info", *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
