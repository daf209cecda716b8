"""The Slurm jobs under a real scheduler: a one-node Slurm on loopback, started and stopped here.

munged, slurmctld and slurmd (Debian's `munge` and `slurm-wlm`) run from a config in a temp dir:
node `localhost` with NodeAddr 127.0.0.1, free ports, state, spool and logs in the temp dir,
proctrack/linuxproc (no cgroups, so it runs in a container). On it:

- `workflows/slurm/precompute.sbatch` on a synthetic corpus of one-clip shards with the tiny teacher:
  the job starts its Ray cluster with `ray_cluster.sh` (the head as an `srun` step, on the node's
  NodeAddr), and commits a store that `cache verify` accepts;
- the same job `scontrol requeue`d after some of its shards are committed: the requeued attempt
  skips them (their markers untouched) and the store equals the uninterrupted job's;
- `workflows/slurm/train.sbatch`: torchrun under srun, two steps on CPU, a checkpoint that loads.

The jobs get the scripts' own #SBATCH lines except the allocation (one node, no GPUs). Slurm's
daemons run as root (slurmd starts every job), so this module needs root and the two packages:
`make slurm-deps` installs them with apt; without root or apt it skips and says why (on CI, where
both are there, a missing package fails instead). Every process it starts, directly or through a
job, carries GEOVR_SLURM_TEST=<temp dir> in its environment: after each job and at the end none may
be left but the three daemons, which are stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.pipeline.index import build_manifest, read_manifest
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.teacher_cache.store import open_store
from tests.conftest import REPO
from tests.test_data_loader import write_qa
from tests.test_precompute import TINY, assert_stores_equal, fov_fixed_teacher, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CLI = str(BIN / "geovr-pipeline")
SLURM_DIR = REPO / "workflows" / "slurm"
NODE = "localhost"
DAEMONS = ("munged", "slurmctld", "slurmd")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CLIPS = 24  # one clip per shard: a precompute commits shards steadily for the requeue to land between
PRECOMPUTE_ARGS = "--clips-per-batch 1 --decode-workers 1 --set precompute.max_inflight_shards=1"
TRAIN_STEPS = 2
JOB_TIMEOUT = 480
# The cluster's directories: munged refuses a key readable by others, and a socket in a directory
# that others cannot enter.
DIRECTORIES = {"munge": 0o700, "run": 0o755, "state": 0o700, "spool": 0o700, "log": 0o755, "jobs": 0o755}
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def slurm_unavailable() -> str | None:
    """Why this machine cannot run the one-node Slurm, or None."""
    if os.geteuid() != 0:
        return "the one-node Slurm needs root (slurmd starts the jobs)"
    commands = (*DAEMONS, "sbatch", "scontrol", "srun")
    missing = [name for name in commands if not shutil.which(name, path=SEARCH_PATH)]
    if not missing:
        return None
    if not shutil.which("apt-get", path=SEARCH_PATH):
        return f"{', '.join(missing)} not installed and apt-get is unavailable (Debian packages slurm-wlm, munge)"
    return f"{', '.join(missing)} not installed: `make slurm-deps` installs slurm-wlm and munge with apt"


def marked_processes(marker: str) -> dict[int, str]:
    """PID -> command line of every live process whose environment holds `marker` (NAME=value)."""
    needle, found = marker.encode(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return found


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"


def listen_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6, from /proc/net)."""
    addresses = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(".".join(map(str, words)) if width == 8 else words.hex())
    return addresses


def is_loopback(address: str) -> bool:
    """A /proc/net address from `listen_addresses`: 127.x.x.x, ::ffff:127.x.x.x or ::1."""
    ipv4_mapped_loopback = address.startswith("00000000000000000000ffff7f")
    return address.startswith("127.") or ipv4_mapped_loopback or address == "0" * 31 + "1"


def slurm_conf(root: Path, hardware: str, ctld_port: int, slurmd_port: int) -> str:
    """One node, one partition, munge over our own socket, everything in `root`, no cgroups."""
    return f"""\
ClusterName=geovrtest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s; 5 is the least Slurm accepts)
AuthInfo=socket={root}/run/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
KillWait=5
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} {hardware} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """The running one-node cluster: its temp dir, the environment its commands need, its daemons."""

    root: Path
    env: dict[str, str]
    marker: str
    cpus: int
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, timeout: float = 60) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command} exited {result.returncode}: {result.stderr[-2000:]}"
        return result.stdout

    def start(self, name: str, *command: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (the daemon keeps it)
        self.daemons[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def submit(self, script: str, env: dict[str, str]) -> int:
        """sbatch `script` from the repository root with the script's #SBATCH lines, on our one node."""
        allocation = ["--nodes=1", f"--cpus-per-task={self.cpus}", "--gpus-per-node=0"]
        command = ["sbatch", "--parsable", *allocation, f"--chdir={self.root}/jobs", str(SLURM_DIR / script)]
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        shown = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", shown))

    def wait(self, job_id: int, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in TERMINAL_STATES:
            assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']} after {timeout}s"
            time.sleep(1)
        return info

    def stray_processes(self) -> dict[int, str]:
        """Processes started here or by a job that are not our daemons or slurmctld's helper
        (slurmscriptd): none once the jobs have ended."""
        daemons = {p.pid for p in self.daemons.values()}
        ctld = self.daemons["slurmctld"].pid if "slurmctld" in self.daemons else None
        return {
            pid: command
            for pid, command in marked_processes(self.marker).items()
            if pid not in daemons and parent_pid(pid) != ctld
        }


def cache_verify(store: Path) -> str:
    result = subprocess.run([CLI, "cache", "verify", str(store)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def job_log(info: dict[str, str]) -> str:
    return Path(info["StdOut"]).read_text()


def assert_completed(info: dict[str, str], restarts: int = 0) -> None:
    state = (info["JobState"], info["ExitCode"], int(info["Restarts"]))
    assert state == ("COMPLETED", "0:0", restarts), f"{state}:\n{job_log(info)[-4000:]}"


def start_slurm(slurm: Slurm) -> None:
    """munged with a fresh key, then slurmctld and slurmd in the foreground; returns once the node is idle."""
    root = slurm.root
    for name, mode in DIRECTORIES.items():
        (root / name).mkdir(mode=mode)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    slurm.start(
        "munged", shutil.which("munged", path=SEARCH_PATH), "--foreground", f"--socket={root}/run/munge.socket",
        f"--key-file={key}", f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
        f"--seed-file={root}/munge/munged.seed",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (root / "run" / "munge.socket").exists():
        assert slurm.daemons["munged"].poll() is None, (root / "log" / "munged.out").read_text()
        assert time.monotonic() < deadline, "munged did not create its socket"
        time.sleep(0.1)
    hardware = slurm.run(shutil.which("slurmd", path=SEARCH_PATH), "-C").splitlines()[0]
    # The node as slurmd sees it (so it registers without a mismatch); memory is not scheduled here.
    hardware = " ".join(
        i for i in hardware.split() if not i.startswith(("NodeName=", "UpTime=", "RealMemory="))
    )
    slurm.cpus = int(re.search(r"CPUs=(\d+)", hardware).group(1))
    conf = Path(slurm.env["SLURM_CONF"])
    conf.write_text(slurm_conf(root, hardware, free_port(), free_port()))
    slurm.start("slurmctld", shutil.which("slurmctld", path=SEARCH_PATH), "-D", "-f", str(conf))
    slurm.start("slurmd", shutil.which("slurmd", path=SEARCH_PATH), "-D", "-N", NODE, "-f", str(conf))
    deadline = time.monotonic() + 120
    while True:
        for name, daemon in slurm.daemons.items():
            log = (root / "log" / f"{name}.out").read_text()
            assert daemon.poll() is None, f"{name} exited {daemon.returncode}:\n{log[-3000:]}"
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=slurm.env, capture_output=True, text=True)
        if states.stdout.strip() == "idle":
            return
        assert time.monotonic() < deadline, f"node not idle: {states.stdout}{states.stderr}"
        time.sleep(0.5)


def stop_slurm(slurm: Slurm) -> dict[int, str]:
    """Cancel our jobs, stop the daemons by PID, kill what is left; returns what had been left."""
    if "slurmctld" in slurm.daemons:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm.env, capture_output=True, text=True)
        if jobs.stdout.split():
            subprocess.run(["scancel", *jobs.stdout.split()], env=slurm.env, timeout=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and slurm.stray_processes():
                time.sleep(1)
    for name in reversed(list(slurm.daemons)):
        daemon = slurm.daemons[name]
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    left = slurm.stray_processes()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_unavailable()
    if reason and os.environ.get("CI") and os.geteuid() == 0 and shutil.which("apt-get", path=SEARCH_PATH):
        pytest.fail(f"{reason} (on CI, as root with apt, `make test` must have installed them)")
    if reason:
        pytest.skip(reason)
    # Short: Ray's socket paths under it must fit 107 bytes. World-readable: munged insists on it
    # for the directories above its socket.
    root = Path(tempfile.mkdtemp(prefix="geovr-slurm-", dir="/tmp"))
    root.chmod(0o755)
    marker = f"GEOVR_SLURM_TEST={root}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{SEARCH_PATH}", SLURM_CONF=str(root / "slurm.conf"))
    env["GEOVR_SLURM_TEST"] = str(root)
    cluster = Slurm(root, env, marker, cpus=0)
    left: dict[int, str] = {}
    try:
        start_slurm(cluster)
        yield cluster
    finally:
        left = stop_slurm(cluster)
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left running (killed now): {left}"


@pytest.fixture(scope="module")
def inputs(slurm: Slurm) -> dict[str, Path]:
    """A corpus of `CLIPS` synthetic scenes indexed one clip per shard, the tiny teacher and student,
    and a QA file with one question per clip."""
    root = slurm.root / "inputs"
    config = SynthConfig(scenes=CLIPS, frames=8, width=160, height=120, fps=4.0, seed=7)
    videos = write_corpus(root / "corpus", config)
    manifest = root / "manifest.parquet"
    build_manifest([root / "corpus" / "videos"], manifest, TINY, clips_per_shard=1, workers=1)
    return {
        "root": root,
        "manifest": manifest,
        "teacher": fov_fixed_teacher(root / "teacher"),
        "model": write_tiny_qwen3vl(root / "model"),
        "qa": write_qa(root / "qa.jsonl", [f"{scene}.mp4" for scene in videos], per_video=1),
    }


def job_env(slurm: Slurm, **values: str) -> dict[str, str]:
    """The submission environment (sbatch exports it to the job): ours plus `values`, without the
    loopback flag of conftest, so that ray_cluster.sh has to keep Ray on loopback by itself."""
    env = dict(slurm.env, VENV=str(BIN.parent), **values)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def precompute_env(slurm: Slurm, inputs: dict[str, Path], store: Path) -> dict[str, str]:
    """precompute.sbatch's variables: the tiny preset on CPU, and free ports for the job's Ray head."""
    head_ports = " ".join(
        f"--{name}={free_port()}"
        for name in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                     "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    )  # fmt: skip
    return job_env(
        slurm,
        MANIFEST=str(inputs["manifest"]), STORE=str(store), TEACHER=str(inputs["teacher"]),
        PRESET="tiny", DEVICE="cpu", PRECOMPUTE_ARGS=PRECOMPUTE_ARGS,
        RAY_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(free_port()), RAY_START_TIMEOUT="240",
        RAY_HEAD_EXTRA_ARGS=f"{head_ports} --temp-dir={slurm.root}/ray --object-store-memory=200000000 "
                            "--include-dashboard=false",  # the Jobs API is not used here: less CPU
    )  # fmt: skip


def markers(store: Path) -> dict[str, tuple[int, int]]:
    """Committed shard -> (inode, mtime in ns) of its done-marker."""
    stats = {p.stem: p.stat() for p in (store / "_done").glob("*.json")}
    return {shard: (stat.st_ino, stat.st_mtime_ns) for shard, stat in stats.items()}


def marker_contents(store: Path) -> dict[str, tuple[list, dict]]:
    """Committed shard -> (its clips, its payload files' checksums) from the done-markers."""
    out = {}
    for path in (store / "_done").glob("*.json"):
        marker = json.loads(path.read_text())
        out[path.stem] = (marker["clips"], {name: entry["sha256"] for name, entry in marker["files"].items()})
    return out


@pytest.fixture(scope="module")
def clean_run(slurm: Slurm, inputs: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    """precompute.sbatch run to the end without interruption."""
    store = inputs["root"] / "store-clean"
    info = slurm.wait(slurm.submit("precompute.sbatch", precompute_env(slurm, inputs, store)))
    return store, info


def test_precompute_job_commits_a_store_that_verifies(slurm, inputs, clean_run):
    store, info = clean_run
    assert_completed(info)
    log = job_log(info)
    assert re.search(r"ray_cluster: 1/1 nodes alive at 127\.0\.0\.1:\d+", log), log[-3000:]
    assert "precompute summary" in log and "ray_cluster: stopped" in log
    assert f"OK: {CLIPS} shards, {CLIPS} clips" in cache_verify(store)
    expected = sorted(row["clip_id"] for row in read_manifest(inputs["manifest"]).rows)
    assert sorted(open_store(store).clip_ids()) == expected and len(expected) == CLIPS
    assert not slurm.stray_processes(), "the job left processes behind"


def wait_for_commits(slurm: Slurm, job_id: int, store: Path, count: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(markers(store)) < count:
        info = slurm.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info['JobState']}:\n{job_log(info)[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {count} shards committed in time"
        time.sleep(0.05)


def requeue_and_wait_until_pending(slurm: Slurm, job_id: int) -> None:
    """`scontrol requeue`, then wait until every process of the attempt has ended and the job waits
    to restart (cred_expire keeps it pending for ~6 s)."""
    slurm.run("scontrol", "requeue", str(job_id))
    deadline = time.monotonic() + 120
    while (info := slurm.job(job_id))["JobState"] != "PENDING":
        assert not (info["JobState"] == "RUNNING" and info["Restarts"] != "0"), "the restart began unobserved"
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']} after the requeue"
        time.sleep(0.1)


def test_requeued_precompute_resumes_and_equals_a_clean_run(slurm, inputs, clean_run):
    store = inputs["root"] / "store-requeued"
    env = precompute_env(slurm, inputs, store)
    job_id = slurm.submit("precompute.sbatch", env)
    wait_for_commits(slurm, job_id, store, 3)
    # The job's Ray head listens on loopback only.
    gcs = listen_addresses(int(env["RAY_PORT"]))
    assert gcs and all(map(is_loopback, gcs)), gcs

    requeue_and_wait_until_pending(slurm, job_id)
    committed = markers(store)
    assert 3 <= len(committed) < CLIPS, f"{len(committed)} of {CLIPS} shards committed at the requeue"
    assert not slurm.stray_processes(), "the requeue left processes of the first attempt"

    info = slurm.wait(job_id)
    assert_completed(info, restarts=1)
    log = job_log(info)
    assert "attempt 0" in log and "DUE TO JOB REQUEUE" in log and "attempt 1" in log, log[-3000:]
    after = markers(store)
    assert {shard: after[shard] for shard in committed} == committed, "a committed shard was rewritten"
    counts = json.loads((store / "run.json").read_text())["counts"]
    assert (counts["shards_skipped"], counts["shards_written"]) == (len(committed), CLIPS - len(committed))

    cache_verify(store)
    clean_store, _ = clean_run
    assert marker_contents(store) == marker_contents(clean_store)
    assert_stores_equal(clean_store, store)
    assert not slurm.stray_processes(), "the job left processes behind"


def test_train_job_writes_a_checkpoint_that_loads(slurm, inputs, clean_run):
    from geovr.student.model import GeoVRStudent

    run = inputs["root"] / "run"
    settings = [
        f"train.steps={TRAIN_STEPS}",
        f"train.checkpoint_every={TRAIN_STEPS}",
        "train.tensorboard=false",
    ]
    env = job_env(
        slurm,
        STORE=str(clean_run[0]), QA=str(inputs["qa"]), MODEL=str(inputs["model"]), RUN=str(run),
        PRESET="tiny", NPROC_PER_NODE="1", RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1",
        TRAIN_ARGS=" ".join(f"--set {item}" for item in settings),
    )  # fmt: skip
    info = slurm.wait(slurm.submit("train.sbatch", env))
    assert_completed(info)
    assert f"rendezvous {NODE}:{env['RDZV_PORT']}" in job_log(info)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    checkpoint = run / "checkpoints" / f"step_{TRAIN_STEPS:08d}"
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    assert (trainer["step"], trainer["world_size"]) == (TRAIN_STEPS, 1)
    GeoVRStudent.from_pretrained(run)  # the run's last checkpoint; refuses heads that miss the config
    trained = load_file(str(checkpoint / "model.safetensors"))
    base = load_file(str(inputs["model"] / "model.safetensors"))
    assert trained.keys() == base.keys() and any((trained[k] != base[k]).any() for k in base), "not trained"
    assert not slurm.stray_processes(), "the job left processes behind"
