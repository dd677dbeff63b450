"""Runs that survive what happens to real runs: faults injected into ``python -m fedgan_jax.main``.

Each test runs ``configs/test.py`` as a user would (a subprocess; the
persistent compilation cache of conftest shared through
``JAX_COMPILATION_CACHE_DIR``, warmed by the reference run), injects one fault
(kill -9, Ctrl-C, a damaged checkpoint, a torn ``metrics.jsonl`` line, a
second run on the workdir, a changed ``num_clients``, a full disk, a bad
argument) and checks what is left: ``metrics.jsonl`` holds rounds 1..N once,
the metrics equal an uninterrupted run's where the fault allows it, and the
user saw one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT
from fedgan_jax.io import lock as lock_lib
from fedgan_jax.io import rundir, tensorboard, writers

ROUNDS = 6
_CACHE = os.environ.get("FEDGAN_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fedgan_jax_test_cache"))
_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
_ENV.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PLATFORMS="cpu")


def _cmd(workdir, rounds=ROUNDS, *extra):
  return [
    sys.executable,
    "-m",
    "fedgan_jax.main",
    "--config",
    "configs/test.py",
    "--workdir",
    str(workdir),
    f"--config.num_rounds={rounds}",
    *extra,
  ]


def _run(workdir, rounds=ROUNDS, *extra, **kwargs):
  return subprocess.run(
    _cmd(workdir, rounds, *extra), cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300, **kwargs
  )


# Runs argv with SIGINT at its default, as for a command typed in a terminal. A background job of
# a non-interactive shell (a CI script, ``nohup ... &``) starts with SIGINT ignored, its children
# inherit that, and Python then installs no KeyboardInterrupt handler. (Reset, then exec: a
# ``preexec_fn`` would fork the multithreaded test process.)
_AS_IN_A_TERMINAL = (
  "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _start(workdir, rounds=ROUNDS):
  return subprocess.Popen(
    [sys.executable, "-c", _AS_IN_A_TERMINAL, *_cmd(workdir, rounds)],
    cwd=ROOT,
    env=_ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_line(proc, prefix: str) -> list[str]:
  """Reads the child's stdout until a line starting with ``prefix`` (the lines read)."""
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(prefix):
      return seen
  raise AssertionError(f"no line starting with {prefix!r}; stdout: {''.join(seen)}; stderr: {proc.stderr.read()}")


def _one_line(text: str) -> str:
  """The single line the user saw (no traceback, nothing else)."""
  lines = text.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
  return lines[0]


def _rounds(workdir) -> list[int]:
  """The round of every line of metrics.jsonl, in file order (every line must parse)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["round"] for line in f]


def _metrics(workdir) -> list[dict]:
  return [
    {k: v for k, v in r.items() if not k.startswith("z/")} for r in rundir.read_records(f"{workdir}/metrics.jsonl")
  ]


def _tb_steps(workdir, tag="train/g_loss/client_0") -> list[int]:
  """The steps at which TensorBoard has ``tag``, over every event file of the run."""
  events = tensorboard.read_events(os.path.join(workdir, "tb"))
  return sorted(e.step for e in events if e.HasField("summary") and any(v.tag == tag for v in e.summary.value))


def _stop(proc, timeout: float = 30.0) -> None:
  """SIGSTOP, then waits until every thread of ``proc`` is stopped.

  ``kill`` returns before the target stops, and a thread in a write finishes it first (the
  TensorBoard writer's queue is written by its own thread): a snapshot taken at once can race.
  """
  proc.send_signal(signal.SIGSTOP)
  tasks = f"/proc/{proc.pid}/task"
  if not os.path.isdir(tasks):  # Not Linux: give it a moment.
    time.sleep(2.0)
    return
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    states = []
    for tid in os.listdir(tasks):
      try:
        with open(os.path.join(tasks, tid, "stat")) as f:
          states.append(f.read().rsplit(")", 1)[1].split()[0])
      except OSError:
        continue  # A thread that just ended.
    if states and all(st in "Tt" for st in states):
      return
    time.sleep(0.01)
  raise AssertionError(f"process {proc.pid} did not stop within {timeout} s")


def _snapshot(workdir) -> dict[str, tuple[int, int]]:
  """Every file under ``workdir`` with its size and modification time (the lock file aside)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != lock_lib.LOCK_NAME:
        st = os.stat(path)
        out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def _assert_equals_reference(workdir, reference):
  assert _rounds(workdir) == list(range(1, ROUNDS + 1))
  assert _metrics(workdir) == reference["metrics"]
  assert _tb_steps(workdir) == list(range(1, ROUNDS + 1))  # TensorBoard: every round once.


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of ROUNDS rounds (also warms the compilation cache for the others)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  p = _run(workdir)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  assert _rounds(workdir) == list(range(1, ROUNDS + 1))
  return {"workdir": str(workdir), "metrics": _metrics(workdir), "stdout": p.stdout, "stderr": p.stderr}


def _copy(reference, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(reference["workdir"], workdir)
  return workdir


# --------------------------------------------------------------------------- the console


def test_console_of_a_three_round_run_is_short(reference, tmp_path):
  workdir = tmp_path / "three"
  p = subprocess.run(
    _cmd(workdir, 3), cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
  )
  assert p.returncode == 0, p.stdout[-3000:]
  lines = p.stdout.splitlines()
  assert len(lines) <= 25 and max(map(len, lines)) <= 300, p.stdout
  assert lines[0] == f"run: configs/test.py -> {workdir} (new run)"
  assert lines[1].startswith("devices: [CpuDevice(id=0)]") and "clients: 2" in lines[1] and "rounds: 3" in lines[1]
  progress = [ln for ln in lines if ln.startswith("round ")]
  assert len(progress) == 3 and "includes compiling" in progress[0] and "ETA" in progress[-1]
  assert f"summary: {workdir}/summary.json" in lines and f"report: {workdir}/report/report.html" in lines
  assert any(ln.startswith("final: swd ") for ln in lines)
  assert not any("orbax" in ln or ln.startswith(("I1", "W1", "E1")) for ln in lines), p.stdout  # No library logs.
  # The rerun of a finished run says so, and changes no metrics.
  again = _run(workdir, 3)
  assert again.returncode == 0 and "(already at round 3 of 3" in again.stdout.splitlines()[0]
  assert _rounds(workdir) == [1, 2, 3]


def test_verbosity_is_honored(reference, tmp_path):
  p = _run(tmp_path / "v", 1, "--verbosity=0")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "checkpoint_manager.py" in p.stderr  # orbax's INFO lines, asked for.
  assert p.stdout.count("round 1/1") == 1  # Progress printed once, not also logged.


# --------------------------------------------------------------------------- interrupted runs


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_the_uninterrupted_metrics(reference, tmp_path):
  workdir = tmp_path / "killed"
  proc = _start(workdir)
  _wait_for_line(proc, "round 2/")  # Printed just before round 2's checkpoint is saved: killed mid-save.
  proc.kill()
  proc.wait()
  p = _run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  assert re.search(r"\(resuming from round [12] of 6\)", p.stdout.splitlines()[0]), p.stdout
  _assert_equals_reference(workdir, reference)


def test_ctrl_c_is_one_line_and_the_rerun_resumes(reference, tmp_path):
  workdir = tmp_path / "ctrl_c"
  proc = _start(workdir)
  _wait_for_line(proc, "round 2/")
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, out + err
  assert re.fullmatch(r"interrupted at round \d; rerun the same command to resume( \(from round \d\))?", _one_line(err))
  assert "Traceback" not in out
  p = _run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  _assert_equals_reference(workdir, reference)


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage):
  workdir = _copy(reference, tmp_path)
  newest = os.path.join(workdir, "checkpoints", str(ROUNDS))
  for root, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(root, name)
      if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
      else:
        os.remove(path)
  p = _run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  line = _one_line(p.stderr)
  assert line.startswith(f"warning: checkpoint of round {ROUNDS} does not restore (") and len(line) <= 300, line
  assert f"; resuming from round {ROUNDS - 1} (it is kept as {ROUNDS}.damaged)" in line
  assert os.path.isdir(f"{newest}.damaged") and os.path.isdir(newest)  # Kept aside; the round saved again.
  _assert_equals_reference(workdir, reference)


def test_torn_last_metrics_line_is_dropped_on_resume(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  # A kill while round 6's line was being written: its checkpoint never came to be.
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(ROUNDS)))
  path = os.path.join(workdir, "metrics.jsonl")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
  p = _run(workdir)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "torn line" in _one_line(p.stderr)
  _assert_equals_reference(workdir, reference)


# --------------------------------------------------------------------------- the workdir


def test_two_runs_on_one_workdir_the_second_stops_and_touches_nothing(reference, tmp_path):
  workdir = tmp_path / "shared"
  first = _start(workdir, 8)
  _wait_for_line(first, "round 1/")
  _stop(first)  # Held mid-run, lock and all: nothing changes under the second run.
  try:
    before = _snapshot(workdir)
    second = _run(workdir, 8)
    after = _snapshot(workdir)
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=300)
  assert second.returncode == 2
  line = _one_line(second.stderr)
  assert f"--workdir {workdir} is in use by another run (pid {first.pid} on " in line, line
  assert second.stdout == "" and after == before
  assert first.returncode == 0, err[-3000:]
  assert _rounds(workdir) == list(range(1, 9))
  assert len(tensorboard.event_files(str(workdir / "tb"))) == 1


def test_changed_num_clients_stops_naming_the_field_and_writes_nothing(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = _snapshot(workdir)
  p = _run(workdir, ROUNDS + 2, "--config.num_clients=3")
  assert p.returncode == 2
  line = _one_line(p.stderr)
  assert "config.num_clients is 2 in the checkpoint, 3 now" in line, line
  invalid = _run(workdir, ROUNDS + 2, "--config.num_clients=0")  # A failed rerun of another kind.
  assert invalid.returncode == 2 and "config.num_clients=0" in _one_line(invalid.stderr)
  assert _snapshot(workdir) == before  # config.json still agrees with summary.json.
  assert json.load(open(os.path.join(workdir, "config.json")))["num_rounds"] == ROUNDS


def _unwritable(tmp_path) -> str:
  if os.geteuid() == 0:  # root writes through permission bits: a path nobody can create.
    return "/proc/fedgan_jax_test/run"
  ro = tmp_path / "read_only"
  ro.mkdir()
  ro.chmod(0o500)
  return str(ro / "run")


@pytest.mark.parametrize(
  "case",
  ["missing_config", "bad_config_argument", "unwritable_workdir", "workdir_under_a_file", "no_workdir"],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, case):
  args = ["--config", "configs/test.py", "--workdir", str(tmp_path / "w")]
  expect = {
    "missing_config": "--config configs/nope.py: no such file",
    "bad_config_argument": "configs/paper.py:nonexistent: unknown setting",
    "unwritable_workdir": "cannot write to --workdir",
    "workdir_under_a_file": "Not a directory",
    "no_workdir": "--workdir is required",
  }[case]
  if case == "missing_config":
    args[1] = "configs/nope.py"
  elif case == "bad_config_argument":
    args[1] = "configs/paper.py:nonexistent"
  elif case == "unwritable_workdir":
    args[3] = _unwritable(tmp_path)
  elif case == "workdir_under_a_file":
    (tmp_path / "file").write_text("")
    args[3] = str(tmp_path / "file" / "run")
  else:
    args = args[:2]
  p = subprocess.run(
    [sys.executable, "-m", "fedgan_jax.main", *args], cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 2
  assert expect in _one_line(p.stderr) and p.stdout == ""


# Every file over 200 KB fails to grow (EFBIG, as a full disk fails a write): the checkpoint's data file, first.
_SMALL_FILES = (
  "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
  "sys.argv[0] = 'fedgan_jax.main'; runpy.run_module('fedgan_jax.main', run_name='__main__')"
)


@pytest.mark.slow
def test_disk_full_on_a_checkpoint_is_one_line_and_the_rerun_recovers(reference, tmp_path):
  workdir = tmp_path / "full"
  args = _cmd(workdir, 3)[3:]  # After "python -m fedgan_jax.main".
  p = subprocess.run(
    [sys.executable, "-c", _SMALL_FILES, *args], cwd=ROOT, env=_ENV, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 2
  line = _one_line(p.stderr)
  assert f"could not be written to {workdir}/checkpoints: File too large" in line, line
  p = _run(workdir, 3)
  assert p.returncode == 0, p.stderr[-3000:]
  assert _rounds(workdir) == [1, 2, 3]


# --------------------------------------------------------------------------- the parts, in-process


def test_workdir_lock_names_its_holder_and_is_released(tmp_path):
  workdir = str(tmp_path / "w")
  with lock_lib.WorkdirLock(workdir):
    with pytest.raises(lock_lib.WorkdirBusyError, match=rf"in use by another run \(pid {os.getpid()} on "):
      with lock_lib.WorkdirLock(workdir):
        pass
  assert not os.path.exists(workdir)  # Created for a run that wrote nothing: removed again.
  os.makedirs(workdir)
  with lock_lib.WorkdirLock(workdir):  # Released: the next run takes it.
    assert "pid" in open(os.path.join(workdir, lock_lib.LOCK_NAME)).read()
  assert open(os.path.join(workdir, lock_lib.LOCK_NAME)).read() == ""  # No stale holder after the run.


def test_truncate_after_drops_torn_later_and_repeated_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"round": r, "x": r}) for r in (1, 2, 3, 2, 4)]
  path.write_text("\n".join(lines) + '\n{"round": 5, "x": [0.1,')
  counts = writers.JsonlWriter(str(path)).truncate_after(3)
  assert counts == {"kept": 3, "dropped": 1, "torn": 1}
  assert [json.loads(ln)["round"] for ln in path.read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_is_cut_back_to_the_restored_round(tmp_path):
  logdir = str(tmp_path / "tb")
  with tensorboard.TensorBoardWriter(logdir) as tb:
    for r in range(1, 6):
      tb.scalars(r, {"loss": float(r)})
  with open(tensorboard.event_files(logdir)[0], "ab") as f:
    f.write(b"\x10\x00\x00")  # A torn record: the writer was killed mid-write.
  with tensorboard.TensorBoardWriter(logdir, keep_until=3) as tb:
    for r in range(4, 7):
      tb.scalars(r, {"loss": float(r)})
  assert len(tensorboard.event_files(logdir)) == 1
  assert _tb_steps(str(tmp_path), "loss") == [1, 2, 3, 4, 5, 6]


def test_progress_rate_and_eta_leave_compilation_out(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(writers.time, "perf_counter", lambda: clock[0])
  progress = writers.Progress(total=10, start=2)
  clock[0] += 30.0  # Compiling, then round 3.
  progress.first_round_done()
  assert progress.line(3) == "round 3/10  first round 30.0 s (includes compiling)"
  clock[0] += 1.0  # Rounds 4 and 5.
  assert progress.line(5) == "round 5/10  2.00 rounds/s  ETA 2 s"


@pytest.mark.parametrize("ignored", [False, True])
def test_ctrl_c_during_a_save_is_held_until_it_ends_unless_ignored(ignored):
  from fedgan_jax.io import checkpoint as ckpt_lib

  before = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
  done = []
  try:
    if ignored:  # nohup / a background job: Ctrl-C stays ignored, even mid-save.
      with ckpt_lib._sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("save")
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    else:  # The save finishes, then the interrupt arrives.
      with pytest.raises(KeyboardInterrupt):
        with ckpt_lib._sigint_deferred():
          os.kill(os.getpid(), signal.SIGINT)
          done.append("save")
      assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, before)
  assert done == ["save"]
