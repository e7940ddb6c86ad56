"""Preemption safety: a stop signal becomes a checkpoint at the next step boundary and a clean, documented exit.

SLURM warns a job before its time limit or a preemption with a signal (``sbatch --signal=B:USR1@SECS`` lets
``slurm/refit.sbatch`` forward SIGUSR1 to every rank; a preemption or ``scancel`` sends SIGTERM to all of them).
Each rank only records the signal; at the end of every optimizer step the ranks agree with one all-reduce (MAX)
whether *any* of them was signalled, so all stop after the same step even when the signal reached them at different
times or only some of them. The loop then saves a checkpoint for that step (unless it just saved one) and raises
``Preempted``; the worker exits with ``PREEMPTED_EXIT_CODE``; the batch script requeues the job and the requeued job
resumes from that checkpoint in the same run dir.

SIGINT (Ctrl-C) is a stop signal too: the first one checkpoints at the next step boundary like SIGTERM; a second
Ctrl-C aborts at once (KeyboardInterrupt: the worker prints one line and exits 130, keeping the last checkpoint). A
second SIGTERM while a stop is already pending restores the default action and kills the process (a stuck rank can
still be terminated).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from dms_megatron.megatron.distributed import rank

#: Worker exit status after a preemption stop: the checkpoint of the last completed step is saved, the run is not
#: finished (no report.json). 0 = finished, 2 = configuration/input error, 3 = diverged (NaN loss), 4 = preempted,
#: 130 = aborted by a second Ctrl-C.
PREEMPTED_EXIT_CODE = 4
ABORTED_EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


_early: list = []  # SIGUSR1s that arrived before the training loop installed its handler


def catch_early_usr1() -> None:
    """Record SIGUSR1 from process start on (imports, model build, data indexing take minutes on big models): its
    default action would kill the rank; the loop's handler picks the recorded signal up and stops after step one.
    SIGTERM keeps its default until then (a job cancelled during start-up just ends)."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: _early.append(signal.Signals(signum).name))


class Preempted(RuntimeError):
    """Training stopped at a step boundary on request; ``step`` is the checkpointed iteration."""

    def __init__(self, step: int, ckpt_dir: Path, signals: list):
        self.step, self.ckpt_dir, self.signals = step, Path(ckpt_dir), signals
        super().__init__(f"preempted ({', '.join(signals) or 'signal on another rank'}): checkpoint of step {step} "
                         f"saved in {ckpt_dir}; run again with the same run dir to resume")


class PreemptionHandler:
    """Records stop signals of this process; ``requested()`` is the collective decision of all ranks."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: list = []
        self._previous: dict = {}

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            print("warning: training runs outside the main thread; SIGUSR1/SIGTERM will not checkpoint and stop "
                  "it (Python delivers signals to the main thread only)", flush=True)
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        if _early:
            print(f"received {', '.join(_early)} during start-up: will checkpoint and stop after the first step",
                  flush=True)
            self.received.extend(_early)
            _early.clear()
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and name in self.received:
            raise KeyboardInterrupt("second Ctrl-C")  # abort now; the last saved checkpoint stays
        if signum == signal.SIGTERM and name in self.received:
            signal.signal(signum, signal.SIG_DFL)  # second TERM: give up waiting for the step boundary
            signal.raise_signal(signum)
            return
        self.received.append(name)
        if rank() == 0:  # every rank got it; one acknowledgement for the job
            hint = " (Ctrl-C again to abort without it)" if signum == signal.SIGINT else ""
            print(f"received {name}: will checkpoint and stop after the current step{hint}", flush=True)

    def requested(self) -> bool:
        """True on every rank iff any rank has received a stop signal. Collective when distributed: call it at the
        same point on all ranks."""
        flag = 1.0 if self.received else 0.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([flag], dtype=torch.float32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0


__all__ = ["PreemptionHandler", "Preempted", "PREEMPTED_EXIT_CODE", "ABORTED_EXIT_CODE", "STOP_SIGNALS",
           "catch_early_usr1"]
