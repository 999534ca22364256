"""A one-node SLURM cluster on localhost (CPU only) for tests: munge, slurmctld and slurmd with a
configuration, state and logs in a temporary folder, on free ports.

`scripts/install.sh` installs the Debian packages (`slurm-wlm`, `munge`); the daemons run in the
foreground (`-D`) as children of the test session and are killed at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from product_runs import bam_env, free_port

START_TIMEOUT_S = 60
CPUS = 16  # declared, not real (`config_overrides`): room for 2 tasks of the sbatch header's --cpus-per-task


def slurm_available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; scripts/install.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def _config(folder: Path, host: str) -> str:
    return f"""\
ClusterName=bamtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire seconds after it was requeued (120 s by default: idle
# time in the requeue test); a credential is checked when slurmd launches a step, within a second or
# two of its making even on a loaded machine, so 10 s still leaves ample time
AuthInfo=cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# the pass that starts a requeued job once it is eligible again comes every sched_interval seconds (60 by default)
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _munge_works() -> bool:
    encode = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if encode.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True, timeout=10).returncode == 0


@dataclass
class SlurmCluster:
    folder: Path
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return bam_env(SLURM_CONF=str(self.folder / "slurm.conf"))

    def start(self) -> "SlurmCluster":
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "slurm.conf").write_text(_config(self.folder, host))
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            log = (self.folder / f"{daemon}.out").open("wb")
            self.daemons.append(subprocess.Popen([daemon, "-D", "-f", str(self.folder / "slurm.conf")], env=self.env,
                                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self._wait_until_idle()
        return self

    def _start_munge(self) -> None:
        if _munge_works():
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        subprocess.run(["su", "munge", "-s", "/bin/sh", "-c", "/usr/sbin/munged"], check=True, timeout=30)
        if not _munge_works():
            raise RuntimeError("munged started but munge credentials do not round-trip")

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.command(["sinfo", "-h", "-o", "%t"], check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        logs = "\n".join((self.folder / f"{name}.out").read_text(errors="replace")[-1500:] for name in ("slurmctld", "slurmd"))
        raise RuntimeError(f"the test SLURM node did not become idle within {START_TIMEOUT_S} s:\n{logs}")

    def command(self, argv: list[str], check: bool = True, cwd: Path | None = None) -> str:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.command(["scontrol", "show", "job", "-o", job_id])
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's record once it has ended (a requeued job goes on until its last run ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return record
            time.sleep(1)
        self.command(["scancel", job_id], check=False)
        raise AssertionError(f"SLURM job {job_id} did not end within {timeout} s: {self.job(job_id)}")

    def stop(self) -> None:
        for daemon in self.daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
