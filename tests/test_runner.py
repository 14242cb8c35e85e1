"""The stage runner: caching by fingerprint, reruns downstream of a change, --stages, --force,
atomic completion under SIGKILL, failures, and `xlp status`."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import load_config
from xlp.pipeline.runner import PipelineError, run_pipeline, stage_states
from toy_stages import BROKEN_STAGES, FAR_STAGES, TOY_STAGES, UNDECLARED_STAGES


def calls(run_dir: Path) -> list[str]:
    path = run_dir / "calls.txt"
    return path.read_text().split("\n")[:-1] if path.exists() else []


def run(run_dir: Path, overrides=(), **kw) -> dict:
    cfg = load_config(None, [f"run.dir={run_dir}", *overrides])
    return run_pipeline(cfg, stages=TOY_STAGES, out=io.StringIO(), **kw)


def test_second_run_skips_every_done_stage(tmp_path, ray_local):
    assert run(tmp_path) == {"numbers": "ran", "total": "ran", "report": "ran"}
    assert run(tmp_path) == {"numbers": "skipped", "total": "skipped", "report": "skipped"}
    assert calls(tmp_path) == ["numbers fresh", "total fresh", "report fresh"]
    marker = json.loads((tmp_path / "total" / "stage.json").read_text())
    assert marker["status"] == "done" and marker["metrics"] == {"total": sum(range(256)) * 100}
    assert marker["ended_at"] >= marker["started_at"]
    assert (tmp_path / "config.yaml").read_text().count("seq_len: 256") == 1


def test_changed_key_reruns_that_stage_and_downstream_only(tmp_path, ray_local):
    run(tmp_path)
    # train.steps is read by `total` only: `numbers` stays, `total` and `report` rerun.
    assert run(tmp_path, ["train.steps=3"]) == {"numbers": "skipped", "total": "ran", "report": "ran"}
    assert (tmp_path / "report" / "report.txt").read_text() == f"total is {sum(range(256)) * 3}\n"
    # A key no stage reads changes nothing.
    assert set(run(tmp_path, ["train.steps=3", "wandb.mode=disabled"]).values()) == {"skipped"}
    # data.seq_len is read by the first stage: everything reruns.
    assert run(tmp_path, ["train.steps=3", "data.seq_len=10"]) == {"numbers": "ran", "total": "ran", "report": "ran"}
    assert (tmp_path / "report" / "report.txt").read_text() == f"total is {sum(range(10)) * 3}\n"


def test_only_selected_stages_and_missing_inputs(tmp_path, ray_local):
    with pytest.raises(PipelineError, match=r"needs stage 'numbers', which is pending.*--stages numbers"):
        run(tmp_path, only=["total"])
    assert run(tmp_path, only=["numbers"]) == {"numbers": "ran"}
    assert run(tmp_path, only=["total", "report"]) == {"total": "ran", "report": "ran"}
    # A stale input is refused too: changing seq_len makes `numbers` stale for this config.
    with pytest.raises(PipelineError, match=r"needs stage 'numbers', which is stale"):
        run(tmp_path, ["data.seq_len=5"], only=["total"])
    with pytest.raises(PipelineError, match=r"unknown stage\(s\) nope; stages: numbers, total, report"):
        run(tmp_path, only=["nope"])


def test_force_reruns_done_stage(tmp_path, ray_local):
    run(tmp_path)
    assert run(tmp_path, only=["total"], force=True) == {"total": "ran"}
    assert calls(tmp_path)[-1] == "total fresh"


def test_replaced_outputs_are_kept_until_clean(tmp_path, ray_local):
    from xlp.pipeline.runner import stale_outputs
    from xlp.pipeline.core.stage import fingerprints

    run(tmp_path)
    fp = {s.name: s for s in stage_states(TOY_STAGES, load_config(None, [f"run.dir={tmp_path}"]), tmp_path)}
    old_total, old_report = fp["total"].fingerprint, fp["report"].fingerprint
    # --force: the done output of `total` moves to .stale/total-<fingerprint>/, whole
    out = io.StringIO()
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    run_pipeline(cfg, stages=TOY_STAGES, out=out, only=["total"], force=True)
    kept = tmp_path / ".stale" / f"total-{old_total}"
    assert (kept / "total.txt").read_text() == str(sum(range(256)) * 100)
    assert json.loads((kept / "stage.json").read_text())["fingerprint"] == old_total
    assert f"--force; the previous output is kept in {kept}" in out.getvalue()
    # a changed key: `total` and `report` rerun, both old outputs kept (a second `total` one beside the first)
    run(tmp_path, ["train.steps=3"])
    names = sorted(p.name for p, _ in stale_outputs(tmp_path))
    assert names == sorted([f"total-{old_total}", f"total-{old_total}.2", f"report-{old_report}"])
    assert (tmp_path / ".stale" / f"report-{old_report}" / "report.txt").is_file()
    # `xlp status` lists them with their size; `xlp clean` deletes them, printing what it frees
    r = subprocess.run([*XLP, "status", str(tmp_path)], capture_output=True, text=True, env=xlp_env(), timeout=120)
    assert r.returncode == 0 and "kept outputs a changed config replaced" in r.stdout, r.stdout + r.stderr
    assert f"total-{old_total}.2" in r.stdout
    total_bytes = sum(n for _, n in stale_outputs(tmp_path))
    r = subprocess.run([*XLP, "clean", str(tmp_path)], capture_output=True, text=True, env=xlp_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("removed ") == 3 and "freed" in r.stdout
    assert total_bytes > 0 and not stale_outputs(tmp_path)
    assert "nothing to clean" in clean_output(tmp_path)
    assert fingerprints(TOY_STAGES, load_config(None, [f"run.dir={tmp_path}", "train.steps=3"]))["total"] == \
        json.loads((tmp_path / "total" / "stage.json").read_text())["fingerprint"]


def clean_output(run_dir: Path) -> str:
    from xlp.pipeline.runner import clean

    out = io.StringIO()
    clean(run_dir, out)
    return out.getvalue()


def test_a_continuing_stage_keeps_its_output_when_only_its_continue_keys_change(tmp_path, ray_local):
    from xlp.pipeline.core.stage import Stage

    stages = [TOY_STAGES[0], Stage("total", reads=("train.steps", "train.lr"), needs=("numbers",),
                                   fn="toy_stages:total", continues=("train.steps",)), TOY_STAGES[2]]
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    run_pipeline(cfg, stages=stages, out=io.StringIO())
    out = io.StringIO()
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.steps=7"])
    assert run_pipeline(cfg, stages=stages, out=out) == {"numbers": "skipped", "total": "ran", "report": "ran"}
    assert calls(tmp_path)[-2:] == ["total resumed", "report fresh"]  # continued in place, nothing kept aside
    assert "total: the config changed only in train.steps: continuing" in out.getvalue()
    assert not (tmp_path / ".stale").exists() or not any(p.name.startswith("total") for p in (tmp_path / ".stale").iterdir())
    # another key of the stage: a new trajectory, the old output is kept aside
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.steps=7", "train.lr=0.5"])
    run_pipeline(cfg, stages=stages, out=io.StringIO())
    assert calls(tmp_path)[-2] == "total fresh"
    assert any(p.name.startswith("total-") for p in (tmp_path / ".stale").iterdir())


def test_failing_stage_is_marked_failed_with_its_error(tmp_path, ray_local):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    with pytest.raises(PipelineError, match=r"stage 'broken' failed: ValueError: the input file example.jsonl line 3"):
        run_pipeline(cfg, stages=BROKEN_STAGES, out=io.StringIO())
    states = {s.name: s.status for s in stage_states(BROKEN_STAGES, cfg, tmp_path)}
    assert states == {"numbers": "done", "broken": "failed"}
    assert "Traceback" in (tmp_path / "broken" / "stage.log").read_text()


def test_a_stage_reading_a_key_it_does_not_declare_fails_naming_it(tmp_path, ray_local):
    """A stage gets only its declared keys (Stage.view): reading another (data.seq_len here, which
    its fingerprint would not follow) fails the stage, naming the stage and the key; nothing written."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    with pytest.raises(PipelineError, match=r"stage 'undeclared' read the config key data.seq_len, which it "
                                            r"does not declare"):
        run_pipeline(cfg, stages=UNDECLARED_STAGES, out=io.StringIO())
    assert {s.name: s.status for s in stage_states(UNDECLARED_STAGES, cfg, tmp_path)} == {"undeclared": "failed"}
    assert not (tmp_path / "undeclared" / "numbers.txt").exists()
    assert calls(tmp_path) == ["undeclared fresh"]


def test_a_stage_whose_process_is_killed_fails_as_the_clusters_fault_and_resumes(tmp_path, ray_local):
    """The stage's own Ray worker SIGKILLed (the OOM killer, its node lost, by hand) while the stage waits on
    its task: Ray's WorkerCrashedError, a retryable failure (`xlp run` exits 75; a Slurm job requeues
    itself), not the run's own error; the rerun keeps the done stage and resumes. (tests/test_ray_faults.py
    takes a whole node away under a stage's task on a cluster of two.)"""
    import threading

    (tmp_path / "hold").touch()  # the stage's task waits while this exists
    killed = []

    def kill_the_stage() -> None:
        started, deadline = tmp_path / "far" / "started", time.time() + 120
        while not started.exists() and time.time() < deadline:
            time.sleep(0.1)
        pid = int((tmp_path / "far" / "stage_pid").read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_stage, daemon=True)
    killer.start()
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    try:
        with pytest.raises(PipelineError, match=r"stage 'far' failed: RayNodeLost: the Ray cluster lost a node or a "
                                                r"worker process the stage used \(WorkerCrashedError: ") as failed:
            run_pipeline(cfg, stages=FAR_STAGES, out=io.StringIO())
    finally:
        (tmp_path / "hold").unlink()
        killer.join(timeout=10)
    assert killed and failed.value.retryable
    assert {s.name: s.status for s in stage_states(FAR_STAGES, cfg, tmp_path)} == {"numbers": "done", "far": "failed"}
    out = io.StringIO()
    assert run_pipeline(cfg, stages=FAR_STAGES, out=out) == {"numbers": "skipped", "far": "ran"}
    assert "> far: resuming" in out.getvalue() and (tmp_path / "far" / "far.txt").is_file()
    assert calls(tmp_path) == ["numbers fresh", "far fresh", "far resumed"]


def test_a_ray_fault_is_found_anywhere_in_the_error_chain(ray_local):
    """What the stage's task raises crosses to the driver without its chain: the task decides from the whole
    chain (Ray's wrapped cause, `raise ... from`, an error raised while handling another)."""
    from ray.exceptions import NodeDiedError, ObjectFreedError, RayTaskError

    from xlp.pipeline.core.node import ray_fault

    lost = NodeDiedError("Task failed because the node it was running on is dead")
    assert ray_fault(lost) is lost
    assert ray_fault(RayTaskError("fn", "tb", lost)) is lost
    try:
        try:
            raise lost
        except NodeDiedError:
            raise ValueError("could not read shard 3")  # noqa: B904 - what a careless handler does
    except ValueError as wrapped:
        assert ray_fault(wrapped) is lost
    try:
        raise OSError("disk") from lost
    except OSError as chained:
        assert ray_fault(chained) is lost
    assert ray_fault(ValueError("the input file example.jsonl line 3 is not JSON")) is None
    assert ray_fault(ObjectFreedError("00" * 28, None, "")) is None  # the program freed it: its own error


def test_stage_output_is_echoed_to_the_terminal(tmp_path, ray_local):
    out = io.StringIO()
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    run_pipeline(cfg, stages=TOY_STAGES, out=out)
    text = out.getvalue()
    assert "wrote 256 numbers" in text and "+ numbers: done" in text and "(pid=" not in text


KILLABLE_RUN = textwrap.dedent(
    """
    import sys
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.runner import run_pipeline
    from toy_stages import TOY_STAGES
    run_pipeline(load_config(None, ["run.dir=" + sys.argv[1]]), stages=TOY_STAGES)
    """
)


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_it_not_done_and_rerun_completes(tmp_path):
    env = xlp_env({"XLP_TEST_TOY_SLEEP": "120"})
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = tmp_path / "total" / "started"
    deadline = time.time() + 120
    while not started.exists():
        assert proc.poll() is None, "the run ended before the stage started"
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    cfg = load_config(tmp_path / "config.yaml")
    states = {s.name: s.status for s in stage_states(TOY_STAGES, cfg, tmp_path)}
    # killed: not done, and not "running" either (no process holds the run dir's lock)
    assert states == {"numbers": "done", "total": "failed", "report": "pending"}
    assert not (tmp_path / "total" / "total.txt").exists()

    env["XLP_TEST_TOY_SLEEP"] = "0"
    rerun = subprocess.run([sys.executable, "-c", KILLABLE_RUN, str(tmp_path)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "= numbers: done" in rerun.stdout and "> total: resuming" in rerun.stdout
    assert (tmp_path / "total" / "total.txt").read_text() == str(sum(range(256)) * 100)
    assert calls(tmp_path) == ["numbers fresh", "total fresh", "total resumed", "report fresh"]


def test_second_run_on_same_dir_is_refused_while_first_holds_it(tmp_path):
    from xlp.pipeline.core.lock import RunLock

    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(PipelineError, match=r"another `xlp run` \(pid \d+ on .*\) is using"):
            run(tmp_path)
    finally:
        lock.release()


# `xlp run` (its main(), as the console script calls it) on the toy stages: the registry's list is the
# one every part of the runner and the CLI reads. argv: RUN_DIR, then `xlp run` arguments after CONFIG.
TOY_XLP_RUN = textwrap.dedent(
    """
    import sys
    from xlp.pipeline.core import registry
    from xlp.pipeline.core.stage import Stage
    from toy_stages import TOY_STAGES
    from xlp.pipeline.cli import main
    # `numbers` continues its output when data.seq_len changes (as train does on train.steps)
    registry.STAGES[:] = [Stage("numbers", reads=("data.seq_len",), needs=(), fn="toy_stages:numbers",
                                continues=("data.seq_len",)), *TOY_STAGES[1:]]
    config = sys.argv[1] + "/toy.yaml"
    open(config, "w").write("run:\\n  name: toy\\n")
    sys.exit(main(["run", config, "--run-dir", sys.argv[1], *sys.argv[2:]]))
    """
)


# `xlp run` of one stage, env_probe (tests/toy_stages.py). argv: RUN_DIR.
ENV_PROBE_RUN = textwrap.dedent(
    """
    import sys
    from xlp.pipeline.core import registry
    from xlp.pipeline.core.stage import Stage
    from xlp.pipeline.cli import main
    registry.STAGES[:] = [Stage("probe", reads=(), needs=(), fn="toy_stages:env_probe")]
    config = sys.argv[1] + "/toy.yaml"
    open(config, "w").write("run:\\n  name: toy\\n")
    sys.exit(main(["run", config, "--run-dir", sys.argv[1]]))
    """
)


def test_xlp_run_on_a_running_ray_passes_its_variables_to_the_stage_tasks(tmp_path):
    """`xlp run` on a Ray it did not start (the session's, in RAY_ADDRESS), whose workers have the Ray's
    environment, not the shell's: the stage's task sees the driver's XLP_* variables, a secret one too
    (XLP_TEST_PROBE_KEY: a *_KEY name), and not a variable outside the passed prefixes; the secret's
    value is in none of that Ray's files (its logs, its runtime-env agent's)."""
    import secrets

    from conftest import SHARED_RAY_TEMP_DIR

    secret = "probe-" + secrets.token_hex(12)
    env = xlp_env({"XLP_TEST_PLAIN": "plain value", "XLP_TEST_PROBE_KEY": secret, "NOT_PASSED_PROBE": "x"})
    assert env.get("RAY_ADDRESS"), "no shared Ray in this session"
    r = subprocess.run([sys.executable, "-c", ENV_PROBE_RUN, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads((tmp_path / "probe" / "env.json").read_text())
    assert seen == {"XLP_TEST_PLAIN": "plain value", "XLP_TEST_PROBE_KEY": secret, "NOT_PASSED_PROBE": None}
    files = [f for f in Path(os.environ[SHARED_RAY_TEMP_DIR]).rglob("*") if f.is_file() and not f.is_socket()]
    assert any(f.suffix in (".log", ".out", ".err") for f in files), "no Ray logs to search"
    assert [f for f in files if secret.encode() in f.read_bytes()] == []
    assert secret not in r.stdout + r.stderr


def _stop_xlp_run(run_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """`xlp run` on the toy stages, sent `signum` once its second stage runs: SIGINT to its whole process
    group, as a terminal's Ctrl-C is (its embedded Ray's processes get it too); SIGTERM to it alone, as
    `kill` does (here to an `xlp run` on a Ray it did not start: the session's)."""
    env = xlp_env({"XLP_TEST_TOY_SLEEP": "120"}, embedded_ray=signum == signal.SIGINT)
    proc = subprocess.Popen([sys.executable, "-c", TOY_XLP_RUN, str(run_dir)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = run_dir / "total" / "started"
    deadline = time.time() + 120
    while not started.exists():
        if proc.poll() is not None:  # ended before its stage started: say why
            raise AssertionError(f"xlp run ended ({proc.returncode}) before the stage started: "
                                 f"{proc.stdout.read()[-2000:]}{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.2)
    t0 = time.time()
    os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 30, "the stage was not stopped promptly"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_stops_the_stage_gracefully_and_marks_it_interrupted(tmp_path):
    r = _stop_xlp_run(tmp_path, signal.SIGTERM)
    assert r.returncode == 143, r.stdout + r.stderr
    assert "! total: SIGTERM: stopping the stage" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "xlp run: stopped by SIGTERM; run the same command again to resume"
    marker = json.loads((tmp_path / "total" / "stage.json").read_text())
    assert marker["status"] == "failed" and "interrupted (SIGTERM)" in marker["error"]


@pytest.mark.slow
def test_ctrl_c_says_ctrl_c_in_one_line_without_a_traceback(tmp_path):
    """Issue 29, item 12: Ctrl-C printed the stage's KeyboardInterrupt traceback and a debug line, then
    "stopped by SIGTERM" (Ray's processes, which the terminal's SIGINT reaches too, sent one back). Now
    one line names Ctrl-C; the traceback and the note stay in the stage's log."""
    r = _stop_xlp_run(tmp_path, signal.SIGINT)
    assert r.returncode == 130, r.stdout + r.stderr
    shown = r.stdout + r.stderr
    assert "Traceback" not in shown and "[xlp]" not in shown and "SIGTERM" not in shown, shown
    assert "! total: Ctrl-C (SIGINT): stopping the stage" in r.stdout
    assert r.stderr.strip().splitlines() == ["xlp run: stopped by Ctrl-C (SIGINT); run the same command again "
                                             "to resume"], r.stderr
    marker = json.loads((tmp_path / "total" / "stage.json").read_text())
    assert marker["status"] == "failed" and "interrupted (Ctrl-C (SIGINT))" in marker["error"]
    log = (tmp_path / "total" / "stage.log").read_text()
    assert "KeyboardInterrupt" in log and "stop requested" in log


@pytest.mark.slow
def test_a_continued_stage_echoes_only_what_it_writes_now(tmp_path):
    """Issue 29, item 12: a continued (or resumed) stage appends to its log; `xlp run` echoed the whole
    log, the earlier attempt's lines as if they ran again. Now only this attempt's lines; the log has both."""
    first = subprocess.run([sys.executable, "-c", TOY_XLP_RUN, str(tmp_path), "--stages", "numbers",
                            "data.seq_len=256"], env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "wrote 256 numbers" in first.stdout, first.stdout + first.stderr
    second = subprocess.run([sys.executable, "-c", TOY_XLP_RUN, str(tmp_path), "--stages", "numbers",
                             "data.seq_len=10"], env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "numbers: the config changed only in data.seq_len: continuing" in second.stdout
    assert "wrote 10 numbers" in second.stdout and "wrote 256 numbers" not in second.stdout, second.stdout
    log = (tmp_path / "numbers" / "stage.log").read_text()
    assert log.index("wrote 256 numbers") < log.index("wrote 10 numbers")


@pytest.mark.slow
def test_a_data_error_shows_the_stages_message_not_rays_traceback(tmp_path):
    """Issue 29, item 12: a bad record met in a data task printed 8-48 lines of Ray traceback (echoed from
    the log, and Ray's remote traceback in the error's text) before the clear line. Now the terminal has
    the stage's own message and the log's path; the log keeps the traceback."""
    bad = tmp_path / "bad.jsonl"
    good = "".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(200))
    bad.write_text(good + '{"text": "unterminated\n' + good)  # line 201: not JSON
    run_dir = tmp_path / "run"
    r = subprocess.run([*XLP, "run", str(REPO / "configs" / "tiny.yaml"), f"data.sources=[{bad}]",
                        "tokenizer.vocab_size=300", "--stages", "tokenizer", "--run-dir", str(run_dir)],
                       env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    shown = r.stdout + r.stderr
    assert "Traceback" not in shown and "ray::" not in shown and "RayTaskError" not in shown, shown
    log = run_dir / "tokenizer" / "stage.log"
    err = r.stderr.strip().splitlines()
    assert err[0].startswith("xlp run: error: stage 'tokenizer' failed: DataError: ") and str(bad) in err[0], err
    assert err[1:] == [f"  full log: {log}"], err
    assert "Traceback" in log.read_text()


def test_ignored_keys_stay_out_of_the_fingerprint():
    from xlp.pipeline.core.stage import Stage, fingerprint

    stage = Stage("train", reads=("train",), needs=(), fn="x:y", ignores=("train.launcher", "train.log_every"))
    base = fingerprint(stage, load_config(None, []), {})
    assert fingerprint(stage, load_config(None, ["train.launcher=local", "train.log_every=3"]), {}) == base
    assert fingerprint(stage, load_config(None, ["train.steps=7"]), {}) != base


def test_stage_registry_imports_nothing_heavy():
    """Each stage module declares its STAGE and imports what it runs with inside run(), so the
    registry (imported by `xlp status`, the config schema, Ray workers) stays cheap."""
    code = ("import sys, xlp.pipeline.stages; "
            "print(sorted(m for m in ('ray', 'torch', 'numpy', 'sentencepiece', 'deepspeed', 'wandb') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=xlp_env(), check=True)
    assert proc.stdout.strip() == "[]"


def test_damaged_run_files_are_named_and_their_stage_resumes_in_place(tmp_path, ray_local, capsys):
    """Issue 29, item 5 with the toy stages: a stage.json that is truncated, not an object, without a
    fingerprint, a running one without its start, or not text reads as a failed attempt that names the
    file (no crash in `xlp status` or `xlp run`), and the next run resumes the stage in place instead of
    moving its output to .stale/; a recorded output whose sha256 changed reruns that stage alone; a
    truncated or edited RUN_DIR/config.yaml is an error naming it, not a config with defaults."""
    from xlp.pipeline.cli import main as xlp_main
    from xlp.pipeline.core.config import ConfigError, load_run_config
    from xlp.pipeline.core.stage import Stage

    stages = [Stage("numbers", reads=("data.seq_len",), needs=(), fn="toy_stages:numbers", outputs=("numbers.txt",)),
              *TOY_STAGES[1:]]
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    run_pipeline(cfg, stages=stages, out=io.StringIO())
    path = tmp_path / "total" / "stage.json"
    good = path.read_bytes()
    fp = json.loads(good)["fingerprint"]
    damages = {
        "truncated": (good[:len(good) // 2], "truncated: "),
        "no fingerprint": (b'{"status": "done"}', "no fingerprint"),
        "a list": (b"[1, 2, 3]", "a JSON list, not an object"),
        "no start": (json.dumps({"status": "running", "fingerprint": fp, "heartbeat_at": time.time()}).encode(),
                     "a running marker without a number in 'started_at'"),
        "not text": (bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"),
    }
    for name, (data, reason) in damages.items():
        path.write_bytes(data)
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / "stage.json").write_bytes(data)  # where `xlp status` looks (the real stages)
        state = {s.name: s for s in stage_states(stages, cfg, tmp_path)}["total"]
        assert state.status == "failed", name
        assert state.damaged.startswith(f"{path} is damaged: ") and reason in state.damaged, (name, state.damaged)
        assert xlp_main(["status", str(tmp_path)]) == 0, name
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
        assert row.split()[1] == "failed" and f"{tmp_path / 'train' / 'stage.json'} is damaged: {reason}" in row, row
        if name in ("truncated", "no fingerprint"):  # the fingerprint read from what is left, and none at all
            out = io.StringIO()
            assert run_pipeline(cfg, stages=stages, out=out) == {"numbers": "skipped", "total": "ran",
                                                                 "report": "skipped"}
            assert f"~ total: {path} is damaged: {reason}" in out.getvalue() and "resuming" in out.getvalue()
            assert calls(tmp_path)[-1] == "total resumed"
            assert not (tmp_path / ".stale").exists()
            assert json.loads(path.read_text())["status"] == "done"
    path.write_bytes(good)
    # an output whose sha256 its done marker recorded, changed: that stage resumes, nothing downstream reruns
    numbers = tmp_path / "numbers" / "numbers.txt"
    numbers.write_text(numbers.read_text()[:100])
    state = {s.name: s for s in stage_states(stages, cfg, tmp_path)}["numbers"]
    assert state.status == "failed" and f"{numbers} is damaged: its sha256 is " in state.damaged, state.damaged
    assert run_pipeline(cfg, stages=stages, out=io.StringIO()) == {"numbers": "ran", "total": "skipped",
                                                                   "report": "skipped"}
    assert calls(tmp_path)[-1] == "numbers resumed" and len(numbers.read_text().split()) == 256
    # RUN_DIR/config.yaml, truncated or edited, is named with what is wrong (by `xlp status` and the ranks)
    config = tmp_path / "config.yaml"
    text = config.read_text()
    for data, reason in ((text[:len(text) // 2], "is truncated: it does not end with the sha256 line"),
                         (text.replace("seq_len: 256", "seq_len: 512"), "is damaged or was edited")):
        config.write_text(data)
        assert xlp_main(["status", str(tmp_path)]) == 1
        assert f"xlp status: error: {config} {reason}" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=reason):
            load_run_config(config)  # what a training rank reads
    config.write_text(text.split("\n", 1)[1].rsplit("# sha256: ", 1)[0])  # as written before it was sealed
    assert load_run_config(config).data.seq_len == 256


def test_missing_input_hint_is_the_users_command(tmp_path, capsys):
    """`xlp run CONFIG overrides --stages train` where the data stages never ran: refused before Ray
    starts, with a command to paste that keeps the config, every override (shell-quoted: the brackets,
    a space) and --run-dir, and names every upstream stage that is not done."""
    import shlex

    from xlp.pipeline.cli import main as xlp_main

    config = tmp_path / "my configs" / "small.yaml"
    config.parent.mkdir()
    config.write_text("run:\n  name: hint\ndata:\n  sources: [stdlib:json]\n")
    overrides = [f"run.dir={tmp_path / 'the run'}", "data.sources=[stdlib:json, stdlib:email]", "train.steps=3"]
    for extra, stages, todo in (([], "train", "tokenizer,shard"), (["--run-dir", str(tmp_path / "other")], "shard", "tokenizer")):
        assert xlp_main(["run", str(config), *overrides, "--stages", stages, *extra]) == 1
        err = capsys.readouterr().err
        hint = err.split("run `", 1)[1].split("` first", 1)[0]
        assert shlex.split(hint) == ["xlp", "run", str(config), *overrides, *extra, "--stages", todo], err
        assert "'data.sources=[stdlib:json, stdlib:email]'" in hint and f"'{config}'" in hint


def test_the_echo_leaves_out_log_only_parts_wherever_the_reads_split_them(tmp_path):
    """The terminal's echo of a stage log reads whatever the stage has written so far: a log-only part
    (a failure's traceback) is left out even when a read ends inside its marker, and the log's earlier
    attempts are not echoed."""
    from xlp.pipeline.runner import LOG_ONLY_BEGIN, LOG_ONLY_END, _LogTail

    log = tmp_path / "stage.log"
    log.write_text("an earlier attempt\n")
    now = f"step 1 ✓\npartial {LOG_ONLY_BEGIN}Traceback ...\nKeyboardInterrupt\n{LOG_ONLY_END}last [xlp] line\n"
    out = io.StringIO()
    tail = _LogTail(log, out)
    data = now.encode()
    with open(log, "ab") as f:
        for i in range(len(data)):  # one byte per read: every split, a character's bytes included
            f.write(data[i:i + 1])
            f.flush()
            tail.pump()
    tail.pump(final=True)
    assert out.getvalue() == "step 1 ✓\npartial last [xlp] line\n"


def test_an_embedded_ray_that_cannot_start_is_tried_twice_and_named(tmp_path):
    """A real failing start (RAY_TMPDIR is a file): the embedded Ray is started a second time (a start
    that timed out on a loaded machine often comes up then), and after the second failure the run fails
    as retryable, naming both causes, instead of Ray's bare exception."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code = ("from xlp.pipeline.runner import _ensure_ray\n"
            "from xlp.pipeline.core.errors import PipelineError\n"
            "try:\n    _ensure_ray()\nexcept PipelineError as e:\n    print('retryable', e.retryable, e)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(not_a_dir)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout.strip().splitlines()[-1]
    assert said.startswith("retryable True could not start an embedded Ray instance, twice: "), said
    assert said.count("Not a directory") == 2, said
