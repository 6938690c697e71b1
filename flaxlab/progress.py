"""A dependency-free progress display: a live bar on a terminal, one line per epoch otherwise."""
import sys
import time


class Progress:
    def __init__(self, epochs, enabled=True, stream=None, log=print, first_epoch=1):
        self.epochs, self.enabled, self.log, self.first_epoch = epochs, enabled, log, first_epoch
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start = time.perf_counter()
        self.epoch = 0
        self._last_draw = 0.0

    def begin_epoch(self, epoch):
        self.epoch = epoch

    def on_step(self, step, steps):
        """Called as steps are dispatched (no host sync): redraws at most 5 times a second."""
        now = time.perf_counter()
        if not self.live or now - self._last_draw < 0.2:
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
