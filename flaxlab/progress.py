"""A dependency-free progress display: a live bar on a terminal, one line per epoch otherwise, plus a line a
minute inside long epochs (a VGG-19 epoch on CIFAR-10 takes 11 minutes on a 2-core CPU; a log would otherwise
stay silent that long)."""
import sys
import time

LINE_EVERY_S = 60.0  # without a terminal: a line this often inside an epoch that runs longer


class Progress:
    def __init__(self, epochs, enabled=True, stream=None, log=print, first_epoch=1):
        self.epochs, self.enabled, self.log, self.first_epoch = epochs, enabled, log, first_epoch
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self.epoch = 0
        self._last_draw = 0.0
        self._last_line = self.start

    def begin_epoch(self, epoch):
        self.epoch = epoch
        self._last_line = time.perf_counter()

    def on_step(self, step, steps, wait=None):
        """Called as steps are dispatched: redraws the bar at most 5 times a second. Without a terminal, once a
        minute first calls `wait` (blocks until the steps dispatched so far have run: dispatch runs ahead of
        them), so that the line's count is of steps done."""
        now = time.perf_counter()
        if not self.live:
            if self.enabled and step < steps and now - self._last_line >= LINE_EVERY_S:
                self._last_line = now  # the wait below is part of the minute to the next line
                if wait is not None:
                    wait()
                elapsed = time.perf_counter() - self.start
                self.log(f"epoch {self.epoch}/{self.epochs}: {step}/{steps} steps  [{elapsed:.0f}s]")
            return
        if now - self._last_draw < 0.2:
            return
        self._last_draw = now
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
