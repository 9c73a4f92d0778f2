"""Progress: each optimizer step reported (state.json and a ``step`` event) from a thread, so
the training loop never waits on the GPU or the disk; checkpoints announced and uploaded; a
stop requested by the watchdog honoured at the next step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import artifacts, telemetry
from . import distributed, profiling

if TYPE_CHECKING:
    from ..agent import Reporter

__all__ = ["ProgressWriter", "progress_callback"]


class ProgressWriter:
    """Reports each step from a thread, so the training loop never waits on the GPU or disk.

    The step's loss is copied to the host asynchronously behind a CUDA event; the thread waits
    for the event, then writes ``state.json`` and a ``step`` event. The time the event completed
    is when the GPU finished the step, which is what tokens/s is measured against.
    """

    def __init__(self, reporter: Reporter, trainer: Any) -> None:
        import queue
        import threading

        self.reporter, self.trainer = reporter, trainer
        self.queue: queue.Queue[Any] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.thread.start()
        self.t0: float | None = None
        self.tokens0 = 0
        self.step0 = 0

    def start(self, t0: float, tokens: int, step: int) -> None:
        """Start the clock: tokens/s counts from here (warm-up included, as users wait it)."""
        self.t0, self.tokens0, self.step0 = t0, tokens, step

    def submit(
        self, state: Any, loss: Any, tokens: int, metrics: dict[str, Any] | None = None
    ) -> None:
        """Queue a step: its loss and the objective's ``metrics`` (device scalars, copied to
        the host without waiting)."""
        import torch

        event = None
        names = tuple(metrics or ())
        values = torch.stack([metrics[k] for k in names]) if metrics else None
        if loss is not None and loss.is_cuda:
            loss = loss.to("cpu", non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        if values is not None and values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            event = event or torch.cuda.Event()  # type: ignore[no-untyped-call]
        if event is not None:
            event.record()
        extra = (names, values)
        self.queue.put(
            (state.global_step, state.max_steps, state.epoch, loss, event, tokens, extra)
        )

    def drain(self) -> None:
        """Wait until every submitted step is reported (before a checkpoint or the end)."""
        self.queue.join()

    def close(self) -> None:
        self.drain()
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._report(*item)
            except Exception as exc:  # reporting must never kill training; say so in the log
                print(f"[agent] progress report failed: {exc!r}", flush=True)
            finally:
                self.queue.task_done()

    def _report(
        self, step: int, total: int, epoch: Any, loss: Any, event: Any, tokens: int, extra: Any
    ) -> None:
        if event is not None:
            event.synchronize()
        now = time.time()
        value = float(loss) if loss is not None else None
        if self.t0 is None:
            self.start(now, tokens, step)
        assert self.t0 is not None
        elapsed = now - self.t0
        done = step - self.step0
        tps = (tokens - self.tokens0) / elapsed if elapsed > 0 and done > 0 else None
        eta = (total - step) * elapsed / done if done > 0 else None
        names, values = extra
        metrics = {n: round(float(v), 4) for n, v in zip(names, values.tolist(), strict=True)} if (
            values is not None) else {}  # fmt: skip
        entry = {"step": step, "loss": value, "tokens": tokens, "t": round(now, 4)}
        self.history.append(entry)
        self.trainer.state.log_history.append({"step": step, "loss": value, **metrics})
        gpu = telemetry.latest(self.reporter)  # the newest GPU sample rides on the step
        self.reporter.update(
            step=step,
            loss=value,
            tokens_per_s=round(tps, 1) if tps else None,
            eta_s=round(eta, 1) if eta is not None else None,
            epoch=epoch,
            metrics=metrics or None,
            **{k: v for k, v in gpu.items() if k in ("gpu_util", "gpu_mem_gb")},
        )
        self.reporter.event(
            "step",
            step=step,
            total=total,
            loss=round(value, 4) if value is not None else None,
            tokens=tokens,
            t=round(now, 4),
            tokens_per_s=round(tps, 1) if tps else None,
            **metrics,
            **gpu,
        )


def progress_callback(reporter: Reporter, upload: str | None, trainer: Any) -> Any:
    """A TrainerCallback: step reports (via :class:`ProgressWriter`), S3 uploads, stops."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.writer = ProgressWriter(reporter, trainer)
            self.profiler: profiling.StepProfiler | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if distributed.is_main():  # one profile, the main rank's
                self.profiler = profiling.from_env(Path(args.output_dir).parent)
            trainer.tokens_seen = state.num_input_tokens_seen
            self.writer.start(time.time(), trainer.tokens_seen, state.global_step)
            reporter.update(phase="training", step=state.global_step, total_steps=state.max_steps)
            reporter.event("training", step=state.global_step, total=state.max_steps)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.profiler is not None:
                self.profiler.step_begin(state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.profiler is not None:
                self.profiler.step_end(state.global_step)
                summary = self.profiler.summary
                if summary is not None:
                    reporter.event("profile", path=str(self.profiler.written),
                                   window=summary["window"],
                                   wall_s_per_step=summary["wall_s_per_step"],
                                   gpu_busy_share=summary["gpu_busy_share"])  # fmt: skip
                    self.profiler = None
            reason = reporter.stop_reason
            loss = trainer.step_loss
            if args.world_size > 1:
                # Every rank: the global batch's loss and tokens, and a stop any rank asks for
                # (rank 0 reads the agent's stop file), so all ranks stop at the same step.
                import torch

                value, tokens, stop = distributed.reduce_step(trainer, reason is not None)
                loss = torch.tensor(value) if value is not None else None
                if stop and reason is None:
                    reason = "stop requested on another rank"
            else:
                tokens = trainer.step_tokens
            trainer.tokens_seen += tokens
            trainer.step_tokens = 0
            state.num_input_tokens_seen = trainer.tokens_seen
            metrics = getattr(trainer, "step_metrics", None)  # a preference objective's
            self.writer.submit(state, loss, trainer.tokens_seen, metrics)
            trainer.step_loss = trainer.step_metrics = None
            if reason is not None and not control.should_training_stop:
                reporter.event("stopping", reason=reason, step=state.global_step)
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:
                self.writer.drain()  # the checkpoint's log_history must hold every step

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            reporter.event("checkpoint", step=state.global_step, path=str(path))
            if upload and distributed.is_main():
                files = artifacts.upload_checkpoint(upload, path)
                reporter.event("checkpoint_uploaded", step=state.global_step, files=files)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.writer.close()

    return Progress()
