"""A copy's completion the test controls: what a CUDA event is while the copy stream runs."""


class FakeCompletion:
    """A copy whose data moved but whose completion the host has not seen until `finished`."""

    def __init__(self) -> None:
        self.finished = False
        self.waited = 0

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:  # what event.synchronize() does: returns once the copy completed
        self.waited += 1
        self.finished = True
