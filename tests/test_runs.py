"""runs.py's helpers called directly: atomic writes, the one-line interrupt message and the refusal of bad
checkpoints, checked against the files a failed write must leave and the messages each refusal must give."""

import errno
import os
import re
import signal

import pytest
import torch
from conftest import run, run_here

import runs


def test_a_crash_between_write_and_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint({"step": 1}, path)

    def crash(*a):
        raise KeyboardInterrupt("killed between write and replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == [
        "ckpt.pt"
    ]  # the old one, and no leftover


def test_atomic_write_removes_its_temporary_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        runs.atomic_write(str(path), write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_an_interrupt_says_what_to_do_next_in_its_one_line(capsys):
    @runs.script
    def main(argv=None):
        raise KeyboardInterrupt(int(signal.SIGTERM), "evaluate it with: python train.py --out_dir x --resume")

    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM and err.count("\n") == 1
    assert err.startswith("error: interrupted by SIGTERM; every file already written is intact; evaluate it with:")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(tmp_path, good_ckpt):
    raw = good_ckpt.read_bytes()
    files = {
        "random.pt": os.urandom(4096),
        "empty.pt": b"",
        "truncated.pt": raw[: len(raw) // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    marker = tmp_path / "code-ran"
    torch.save({"format": runs.FORMAT, "evil": RunsCode(marker)}, tmp_path / "code.pt")
    torch.save({"hello": torch.zeros(3)}, tmp_path / "foreign.pt")
    ck = runs.load_checkpoint(str(good_ckpt))
    ck["model_config"]["attn_layers"] = 2  # weights of a baseline, config of an attention model
    torch.save(ck, tmp_path / "incompatible.pt")
    del ck["args"]  # hand-made: a checkpoint of this format without its settings
    torch.save(ck, tmp_path / "no-args.pt")
    return marker


@pytest.mark.parametrize(
    "name,message",
    [
        ("random.pt", "is not a readable tinydiff checkpoint"),
        ("empty.pt", "is not a readable tinydiff checkpoint"),
        ("truncated.pt", "is not a readable tinydiff checkpoint"),
        ("code.pt", "is not a readable tinydiff checkpoint"),
        ("foreign.pt", "is not a tinydiff checkpoint"),
        ("incompatible.pt", "do not fit its config"),
        ("no-args.pt", "lacks parts of a tinydiff checkpoint (args)"),
    ],
)
def test_bad_checkpoints_are_refused_without_running_their_code(trained, tmp_path, name, message):
    out, _ = trained
    marker = bad_files(tmp_path, out / "ckpt.pt")
    p = run("sample.py", "--ckpt", tmp_path / name, "--n", 10, check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(runs.CheckpointError, match=re.escape(message)):
        runs.model_from_checkpoint(runs.load_checkpoint(str(tmp_path / name)))
    assert not marker.exists()  # the pickle's code never ran


def test_an_unexpected_error_is_one_line_exit_1_and_its_traceback_is_kept(capsys):
    """The one handler every script's entry point has: a defect names itself, says where its traceback was written,
    and exits 1. Reference: the traceback file holds the raising line."""

    @runs.script
    def main(argv=None):
        raise ZeroDivisionError("a defect deep in the code")

    with pytest.raises(SystemExit) as stop:
        main([])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected ZeroDivisionError: a defect deep in the code" in err
    path = re.search(r"the full traceback is in (\S+);", err).group(1)
    with open(path) as f:
        assert 'raise ZeroDivisionError("a defect deep in the code")' in f.read()
    os.remove(path)


def test_a_non_finite_weight_is_never_saved_and_a_full_disk_is_an_oserror(tmp_path, monkeypatch):
    """Reference: the folder's files. torch.save reports a full disk as a RuntimeError; save_checkpoint turns it into
    the OSError every script already answers with 'free some space', and leaves the last checkpoint as it was."""
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, path)
    with pytest.raises(runs.DivergedError, match="model weight w is not finite"):
        runs.save_checkpoint({"step": 2, "model": {"w": torch.tensor([1.0, float("inf")])}}, path)

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="is the disk full"):
        runs.save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "5"}])
def test_a_stray_world_size_is_refused_in_one_line_before_any_folder_is_made(tmp_path, monkeypatch, env):
    """Reference: the folder that would have been made does not exist."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = run_here("train.py", "--dataset", "moons", "--train_steps", 2, "--out_dir", tmp_path / "run")
    assert p.returncode == 2 and "is not a torchrun launch" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_conditions_and_renamed_flags_is_read_with_what_its_run_did(tmp_path):
    """A checkpoint of the earlier layout (no "condition", no label or hold-out settings, --eval_batch_size), made
    here by removing those keys from a fresh one: the loader reads it with the values its run used."""
    out = tmp_path / "run"
    assert run("train.py", "--dataset", "moons", "--train_steps", 2, "--n", 100, "--log_interval", 1, "--out_dir", out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["condition"]
    for k in ("label_column", "cond_columns", "conditional", "p_uncond", "holdout", "prediction_type", "dequantize"):
        del ckpt["args"][k]
    ckpt["args"]["eval_batch_size"] = ckpt["args"].pop("n")
    torch.save(ckpt, out / "ckpt.pt")
    read = runs.load_checkpoint(str(out / "ckpt.pt"))
    assert read["condition"] == {"kind": None, "names": None} and read["args"]["n"] == 100
    assert read["args"]["prediction_type"] == "epsilon" and read["args"]["holdout"] == 0.1
    assert run("sample.py", "--out_dir", out, "--n", 20, "--sampler", "ddim", "--sample_steps", 2)
