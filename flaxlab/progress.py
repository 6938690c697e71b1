"""A dependency-free progress display: a live bar on a terminal, one line per epoch otherwise, plus a line a
minute inside long epochs (a VGG-19 epoch on CIFAR-10 takes 11 minutes on a 2-core CPU; a log would otherwise
stay silent that long)."""
import collections
import sys
import time

LINE_EVERY_S = 60.0  # without a terminal: a line this often inside an epoch that runs longer
PROBE_EVERY_S = 1.0  # without a terminal: how often to keep a step's probe (see `on_step`); a terminal's bar: 0.2 s
POLL_S = 0.01  # `wait`'s sleep between looks: at most this late to notice the epoch has run


class Progress:
    def __init__(self, epochs, enabled=True, stream=None, log=print, first_epoch=1):
        self.epochs, self.enabled, self.log, self.first_epoch = epochs, enabled, log, first_epoch
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self.epoch = 0
        self._last_draw = self._last_probe = 0.0
        self._last_line = self.start
        self._probes, self._done, self._steps = collections.deque(), 0, 0

    def begin_epoch(self, epoch):
        self.epoch = epoch
        self._last_line = time.perf_counter()
        self._probes.clear()
        self._done = 0

    def on_step(self, step, steps, probe=None):
        """Called as steps are dispatched. Dispatch runs ahead of the steps run (up to ~32 steps on XLA:CPU:
        minutes of a VGG-19 at 224), so what is shown is the last step known to have run: `probe()`, called
        here if at all, returns an array that is ready once this step has run. One is kept for every step
        dispatched before the epoch's first step has run (a burst of quick calls), then one a second at most;
        they are polled, never waited for. Without `probe` a step counts as run when dispatched."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self._steps = steps
        if probe is None:
            self._done = step
        # polled only until a step has run: after that the hot path needs no is_ready() call per step
        elif not (self._done or self._steps_run()) or now - self._last_probe >= (0.2 if self.live else PROBE_EVERY_S):
            self._last_probe = now
            self._probes.append((step, probe()))
        self._show(now)

    def wait(self, arrays):
        """Returns once `arrays` (the epoch's last outputs) are computed: dispatch runs ahead, so a large network's
        whole epoch may still be queued (16 steps of ResNet-18 at 224 on a 2-core CPU: 3 minutes), and meanwhile
        the bar moves and the minute lines go on. The caller then blocks on them, at once."""
        if not self.enabled:
            return
        while not all(array.is_ready() for array in arrays):
            time.sleep(POLL_S)
            self._show(time.perf_counter())

    def _show(self, now):
        steps = self._steps
        if self.live:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self._draw(self._steps_run(), steps)
        elif now - self._last_line >= LINE_EVERY_S and self._steps_run() < steps:
            self._last_line = now
            elapsed = now - self.start
            self.log(f"epoch {self.epoch}/{self.epochs}: {self._steps_run()}/{steps} steps  [{elapsed:.0f}s]")

    def _steps_run(self):
        while self._probes and self._probes[0][1].is_ready():
            self._done = max(self._done, self._probes.popleft()[0])
        return self._done

    def _draw(self, step, steps):
        width = 30
        filled = int(width * step / steps)
        self.stream.write(f"\repoch {self.epoch}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{step}/{steps} steps")
        self.stream.flush()

    def end_epoch(self, line):
        if self.live:
            self.stream.write("\r" + " " * 70 + "\r")
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / (self.epoch - self.first_epoch + 1) * (self.epochs - self.epoch)  # a resumed run starts late
            self.log(f"epoch {self.epoch}/{self.epochs}  {line}  [{elapsed:.0f}s, eta {eta:.0f}s]")
